//! Pieces: the unit a relay verifies and forwards, smaller than a chunk.
//!
//! A chunk is one zstd frame (1–4 MiB uncompressed) because smaller frames compress worse. But a
//! relay that waits for a whole chunk before forwarding it delays every hop below it by one
//! chunk time, and in a chain of N nodes that adds up to (N−1) chunk times. So a chunk travels as
//! [`PIECE_LEN`]-byte pieces, and a relay forwards each piece as soon as it is verified.
//!
//! Verification needs no change to the manifest: blake3 is a tree hash, and every aligned
//! `PIECE_LEN` piece of a chunk is a subtree of that tree (`PIECE_LEN` is a power-of-two multiple
//! of blake3's 1 KiB chunk, and blake3's tree is left-balanced). The sender first sends the
//! pieces' chaining values; the receiver checks that they combine into the chunk's hash from the
//! manifest ([`check_piece_hashes`]), then checks each piece against its chaining value
//! ([`piece_ok`]) before it forwards or keeps it. A single-piece chunk's "chaining value" is
//! simply its blake3 hash.

use std::ops::Range;

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::msg::Digest;

/// Bytes per piece (the last piece of a chunk may be shorter).
pub const PIECE_LEN: usize = 128 << 10;

/// Pieces in a chunk of `len` compressed bytes (at least one).
pub fn piece_count(len: usize) -> usize {
    len.div_ceil(PIECE_LEN).max(1)
}

/// Byte range of piece `i` in a chunk of `len` bytes (empty past the end).
pub fn piece_range(len: usize, i: usize) -> Range<usize> {
    let start = i.saturating_mul(PIECE_LEN).min(len);
    start..start.saturating_add(PIECE_LEN).min(len)
}

/// The pieces' chaining values of `data` (one chunk), in order; for a single-piece chunk, its
/// blake3 hash.
pub fn piece_hashes(data: &[u8]) -> Vec<Digest> {
    let n = piece_count(data.len());
    if n == 1 {
        return vec![*blake3::hash(data).as_bytes()];
    }
    (0..n)
        .map(|i| {
            let r = piece_range(data.len(), i);
            blake3::Hasher::new()
                .set_input_offset(r.start as u64)
                .update(&data[r])
                .finalize_non_root()
        })
        .collect()
}

/// Whether piece `i` of a chunk of `chunk_len` bytes matches `expected` (its entry in the
/// chunk's piece hashes).
pub fn piece_ok(chunk_len: usize, i: usize, piece: &[u8], expected: &Digest) -> bool {
    if piece_range(chunk_len, i).len() != piece.len() {
        return false;
    }
    let got = if piece_count(chunk_len) == 1 {
        *blake3::hash(piece).as_bytes()
    } else {
        blake3::Hasher::new()
            .set_input_offset((i * PIECE_LEN) as u64)
            .update(piece)
            .finalize_non_root()
    };
    got == *expected
}

/// Chaining value of the subtree over pieces `first..first + count` (bytes `start..end`).
fn subtree(hashes: &[Digest], first: usize, start: u64, end: u64) -> ChainingValue {
    if end - start <= PIECE_LEN as u64 {
        return hashes[first];
    }
    let (l, r) = halves(hashes, first, start, end);
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

/// Chaining values of the left and right subtrees of the node over bytes `start..end` (more than
/// one piece; its first piece is `first`): blake3 splits at the largest power-of-two number of
/// its 1 KiB chunks that leaves some bytes on the right.
fn halves(hashes: &[Digest], first: usize, start: u64, end: u64) -> (ChainingValue, ChainingValue) {
    let left = left_subtree_len(end - start);
    let l = subtree(hashes, first, start, start + left);
    let r = subtree(
        hashes,
        first + (left / PIECE_LEN as u64) as usize,
        start + left,
        end,
    );
    (l, r)
}

/// Piece hashes that do not combine into the chunk's hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PieceError {
    /// Wrong number of piece hashes for the chunk's length.
    #[error("{got} piece hashes for a chunk of {len} bytes, expected {expected}")]
    Count {
        /// Hashes received.
        got: usize,
        /// Hashes a chunk of this length has.
        expected: usize,
        /// The chunk's length.
        len: usize,
    },
    /// They do not combine into the chunk's hash.
    #[error("the piece hashes do not combine into the chunk's blake3")]
    Mismatch,
}

/// Checks that `hashes` are the piece hashes of a chunk of `chunk_len` bytes whose blake3 is
/// `chunk_hash`: after this, a piece that passes [`piece_ok`] is a piece of that very chunk.
pub fn check_piece_hashes(
    chunk_len: usize,
    hashes: &[Digest],
    chunk_hash: &Digest,
) -> Result<(), PieceError> {
    let n = piece_count(chunk_len);
    if hashes.len() != n {
        return Err(PieceError::Count {
            got: hashes.len(),
            expected: n,
            len: chunk_len,
        });
    }
    let root = if n == 1 {
        hashes[0]
    } else {
        let (l, r) = halves(hashes, 0, 0, chunk_len as u64);
        *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()
    };
    if root == *chunk_hash {
        Ok(())
    } else {
        Err(PieceError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    fn roundtrip(len: usize) {
        let d = data(len, 7);
        let root = *blake3::hash(&d).as_bytes();
        let h = piece_hashes(&d);
        assert_eq!(h.len(), piece_count(len));
        check_piece_hashes(len, &h, &root).unwrap();
        for (i, cv) in h.iter().enumerate() {
            assert!(piece_ok(len, i, &d[piece_range(len, i)], cv), "piece {i}");
        }
    }

    #[test]
    fn piece_hashes_combine_into_blake3_at_the_edges() {
        for len in [
            0,
            1,
            1024,
            PIECE_LEN - 1,
            PIECE_LEN,
            PIECE_LEN + 1,
            2 * PIECE_LEN,
            3 * PIECE_LEN - 5,
            4 * PIECE_LEN,
            (1 << 20) + 40,
            5 * PIECE_LEN + 1024,
            (4 << 20) + 17,
        ] {
            roundtrip(len);
        }
    }

    #[test]
    fn a_wrong_piece_or_hash_list_is_refused() {
        let len = 3 * PIECE_LEN + 100;
        let d = data(len, 1);
        let root = *blake3::hash(&d).as_bytes();
        let mut h = piece_hashes(&d);
        // A flipped byte fails its piece only.
        let mut bad = d[piece_range(len, 1)].to_vec();
        bad[77] ^= 1;
        assert!(!piece_ok(len, 1, &bad, &h[1]));
        assert!(piece_ok(len, 0, &d[piece_range(len, 0)], &h[0]));
        // A piece checked at the wrong position fails (the offset is part of its hash).
        assert!(!piece_ok(len, 2, &d[piece_range(len, 1)], &h[1]));
        // A short piece fails.
        assert!(!piece_ok(len, 3, &d[len - 50..], &h[3]));
        // Hashes that do not combine into the root, or too few of them, are refused.
        assert_eq!(
            check_piece_hashes(len, &h[..3], &root),
            Err(PieceError::Count {
                got: 3,
                expected: 4,
                len
            })
        );
        h[2][0] ^= 1;
        assert_eq!(
            check_piece_hashes(len, &h, &root),
            Err(PieceError::Mismatch)
        );
        // Another chunk's hashes with this chunk's root: refused.
        let other = piece_hashes(&data(len, 2));
        assert_eq!(
            check_piece_hashes(len, &other, &root),
            Err(PieceError::Mismatch)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn piece_hashes_match_blake3(len in 0usize..(9 * PIECE_LEN)) {
            roundtrip(len);
        }
    }
}
