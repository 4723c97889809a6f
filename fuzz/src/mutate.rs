//! Input generation: a deterministic generator (input `i` of seed `s` is always the same bytes)
//! and the mutations applied to the seed corpus.

/// splitmix64: small, fast, and good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for input `index` of run `seed`.
    pub fn for_input(seed: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        let a = r.next_u64();
        let mut r = Rng(a ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// A size in `1..=max`, small sizes far more likely than large ones.
    pub fn size(&mut self, max: usize) -> usize {
        let max = max.max(1);
        let bits = self.below(14);
        1 + self.below((1usize << bits).min(max))
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Inputs are cut to this size (the largest seed is far smaller).
pub const MAX_INPUT: usize = 1 << 20;

const INTERESTING_BYTES: [u8; 8] = [0, 0xff, 0x7f, 0x80, 1, 0xfe, b'0', b'7'];

/// Length-like values written over 4 or 8 bytes.
const INTERESTING_U64: [u64; 14] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    16 * 1024 * 1024,
    16 * 1024 * 1024 + 1,
    20 * 1024 * 1024 + 1,
    i64::MAX as u64,
    u64::MAX,
];

/// Mutates `d` once: bit flips, interesting bytes, huge length fields, inserted, deleted or
/// duplicated ranges, splices with another seed, truncation, dictionary tokens.
pub fn mutate(d: &mut Vec<u8>, rng: &mut Rng, corpus: &[Vec<u8>], dict: &[&[u8]]) {
    let len = d.len();
    match rng.below(13) {
        0 if len > 0 => {
            let i = rng.below(len);
            d[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            d[i] = *rng.pick(&INTERESTING_BYTES);
        }
        2 if len >= 4 => {
            // A length field set huge (or zero), little or big endian, 4 or 8 bytes.
            let v = *rng.pick(&INTERESTING_U64);
            let wide = len >= 8 && rng.below(2) == 0;
            let w = if wide { 8 } else { 4 };
            let i = rng.below(len - w + 1);
            let bytes = if rng.below(4) == 0 {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            if wide {
                d[i..i + 8].copy_from_slice(&bytes);
            } else if rng.below(4) == 0 {
                d[i..i + 4].copy_from_slice(&(v as u32).to_be_bytes());
            } else {
                d[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
            }
        }
        3 => {
            let n = rng.size(64);
            let i = rng.below(len + 1);
            let ins = rng.bytes(n);
            d.splice(i..i, ins);
        }
        4 if len > 0 => {
            let n = rng.size(len);
            let i = rng.below(len - n + 1);
            d.drain(i..i + n);
        }
        5 if len > 0 => {
            // Duplicate a range, possibly many times (nesting bombs, long lines, many entries).
            let n = rng.size(len);
            let i = rng.below(len - n + 1);
            let times = if rng.below(4) == 0 { rng.size(4096) } else { 1 };
            let piece = d[i..i + n].to_vec();
            let at = rng.below(len + 1);
            let mut ins = Vec::with_capacity(piece.len() * times);
            for _ in 0..times {
                if ins.len() + piece.len() > MAX_INPUT {
                    break;
                }
                ins.extend_from_slice(&piece);
            }
            d.splice(at..at, ins);
        }
        6 if !corpus.is_empty() => {
            // Splice: our head, another seed's tail.
            let other = rng.pick(corpus);
            let a = rng.below(len + 1);
            let b = rng.below(other.len() + 1);
            d.truncate(a);
            d.extend_from_slice(&other[b..]);
        }
        7 if len > 0 => {
            let at = rng.below(len);
            d.truncate(at);
        }
        8 | 9 if !dict.is_empty() => {
            let tok = *rng.pick(dict);
            let i = rng.below(len + 1);
            if rng.below(2) == 0 || len == 0 {
                d.splice(i..i, tok.iter().copied());
            } else {
                let end = (i + tok.len()).min(len);
                d.splice(i..end, tok.iter().copied());
            }
        }
        10 if len > 1 => {
            // Overwrite a range with a copy of another range of the same input.
            let n = rng.size(len / 2);
            let src = rng.below(len - n + 1);
            let dst = rng.below(len - n + 1);
            let piece = d[src..src + n].to_vec();
            d[dst..dst + n].copy_from_slice(&piece);
        }
        11 if len > 0 => {
            let i = rng.below(len);
            let delta = (rng.below(33) as u8).wrapping_sub(16);
            d[i] = d[i].wrapping_add(delta);
        }
        12 => {
            // Replace a run of ASCII digits by a huge or negative number.
            let nums: [&[u8]; 6] = [
                b"18446744073709551616",
                b"18446744073709551615",
                b"4294967296",
                b"-1",
                b"99999999999999999999999999",
                b"0",
            ];
            if let Some(start) = (0..8)
                .map(|_| rng.below(len.max(1)))
                .find(|&i| d.get(i).is_some_and(u8::is_ascii_digit))
            {
                let mut end = start;
                while end < d.len() && d[end].is_ascii_digit() {
                    end += 1;
                }
                let n = *rng.pick(&nums);
                d.splice(start..end, n.iter().copied());
            }
        }
        _ => {
            let i = rng.below(len + 1);
            d.insert(i, rng.next_u64() as u8);
        }
    }
    d.truncate(MAX_INPUT);
}

/// Input `index` of run `seed`: the seeds themselves first, then 1 in 16 built from random
/// bytes by the target's `arbitrary` generator, the rest seeds with 1 to 8 mutations.
pub fn generate(
    corpus: &[Vec<u8>],
    dict: &[&[u8]],
    arbitrary: fn(&mut arbitrary::Unstructured<'_>) -> arbitrary::Result<Vec<u8>>,
    seed: u64,
    index: u64,
) -> Vec<u8> {
    if let Some(s) = usize::try_from(index).ok().and_then(|i| corpus.get(i)) {
        return s.clone();
    }
    let mut rng = Rng::for_input(seed, index);
    if corpus.is_empty() || rng.below(16) == 0 {
        let n = rng.size(8192);
        let raw = rng.bytes(n);
        let mut u = arbitrary::Unstructured::new(&raw);
        return arbitrary(&mut u).unwrap_or(raw);
    }
    let mut d = rng.pick(corpus).clone();
    let rounds = 1usize << rng.below(4);
    for _ in 0..rounds {
        mutate(&mut d, &mut rng, corpus, dict);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arb(u: &mut arbitrary::Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
        u.arbitrary()
    }

    #[test]
    fn generation_is_deterministic_and_mutates() {
        let corpus = vec![b"hello: world\n".to_vec(), vec![0u8; 64]];
        let mut changed = 0;
        for i in 0..2000 {
            let a = generate(&corpus, &[b": "], arb, 7, i);
            let b = generate(&corpus, &[b": "], arb, 7, i);
            assert_eq!(a, b, "input {i} differs between two generations");
            if !corpus.contains(&a) {
                changed += 1;
            }
        }
        assert!(changed > 1500, "only {changed} of 2000 inputs were mutated");
        assert_eq!(generate(&corpus, &[], arb, 7, 0), corpus[0]);
        assert_ne!(
            generate(&corpus, &[], arb, 7, 100),
            generate(&corpus, &[], arb, 8, 100)
        );
    }
}
