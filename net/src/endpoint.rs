//! QUIC endpoints with kd's transport parameters.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Idle time after which a silent peer is declared gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval (well under [`IDLE_TIMEOUT`]) of the control connections (agent and
/// coordinator: few packets for a coordinator with thousands of agents).
pub const KEEP_ALIVE: Duration = Duration::from_millis(2000);
/// Keep-alive interval of the data connections between agents (parent and child): a dead
/// parent or child is told from a live one with nothing to send after a second without a
/// packet (`kd_proto::upstream::MIN_QUIET`), not seconds.
pub const DATA_KEEP_ALIVE: Duration = Duration::from_millis(250);
/// UDP receive buffer size asked of the kernel (the default loses packets on loopback).
pub const RECV_BUFFER: usize = 4 * 1024 * 1024;
/// UDP receive buffer a server endpoint (the coordinator's: every agent's handshake and
/// keep-alives come to its one socket) asks for beyond `net.core.rmem_max` when it may
/// (`SO_RCVBUFFORCE`, root): while its process waits for a CPU (a storm of agents on a busy
/// host) datagrams wait there instead of being dropped. Measured with 1000 agents on the
/// coordinator's 2 cores: 1300–1900 datagrams dropped per run with 4 MiB, handshakes stalled
/// for 30 s and agents taken for silent.
pub const SERVER_RECV_BUFFER: usize = 32 * 1024 * 1024;
/// UDP send buffer size asked of the kernel (which doubles it for its bookkeeping). It bounds
/// what a sender keeps queued in its own host, as TCP's small-queues limit does for TCP: a
/// sender whose link is the bottleneck then waits for the socket instead of filling the host's
/// queue until it drops. Measured on the bench rig (100 Mbit/s links, 50 ms queues) with 4 MiB:
/// every hop ran with its queue full (RTT 30–45 ms, a relay's data waiting that long before it
/// left), whole GSO batches dropped, and the retransmissions cost a quarter of the agents' CPU.
/// The 128 KiB the kernel then grants are 10 ms at 100 Mbit/s and 0.1 ms at 10 Gbit/s; on veth
/// at 5 Gbit/s it did not lower the rate (one node's CPU is the limit there, ~1.2 Gbit/s).
pub const SEND_BUFFER: usize = 64 * 1024;

/// Initial maximum UDP payload (see [`transport`]).
pub const INITIAL_MTU: u16 = 1452;
/// RTT assumed before the first sample (quinn's default is RFC 9002's 333 ms). kd runs on a
/// LAN: a lost or dropped handshake packet — typically a child's first packet reaching a parent
/// agent that has not yet taken its own plan, which drops it — is sent again after ~60 ms
/// (3 × this) instead of 1 s. Measured: that second was a whole second lost by every node
/// downstream of the late hop. A slower peer (TCG guests) only costs a few duplicate packets.
pub const INITIAL_RTT: Duration = Duration::from_millis(20);
/// Bytes a connection may hold unacknowledged (buffered or in flight). A writer blocks beyond
/// it, so what a sender has handed to a stream stays within a few chunks of what the child has
/// received: sibling pacing ([`crate::pace`]) then paces deliveries, not buffers (with 32 MiB, a
/// child starved by congestion control at the start could be 10 chunks behind its sibling
/// while the pacer saw them level). 4 MiB is several times a LAN path's bandwidth × (RTT +
/// switch queue) at 100 Mbit/s–10 Gbit/s.
pub const SEND_WINDOW: u64 = 4 * 1024 * 1024;
/// Largest UDP payload path-MTU discovery looks for: a 9000-byte (jumbo) Ethernet MTU less the
/// IPv6 and UDP headers. On a 1500-byte path the probes above [`INITIAL_MTU`] are lost and the
/// connection stays at it; where the switches carry jumbo frames each datagram carries six times
/// as much, and most of a relay's CPU is per datagram.
pub const MAX_UDP_PAYLOAD: u16 = 8952;
/// Ack-eliciting packets a peer may receive before it must acknowledge (see [`transport`]).
pub const ACK_THRESHOLD: u32 = 64;
/// Congestion window a connection starts with: two ACK_THRESHOLD batches of full datagrams.
/// With RFC 9002's ten datagrams, a peer that acknowledges every ACK_THRESHOLD packets answers
/// each round of slow start only at its max_ack_delay (25 ms): a new hop then took ~60 ms to
/// carry its first chunk, a lag each later chunk kept for the whole run (a relay's uplink is no
/// faster than its downlink, so a queue that forms at a hop never drains).
pub const INITIAL_WINDOW: u64 = 2 * ACK_THRESHOLD as u64 * INITIAL_MTU as u64;

/// kd's QUIC transport parameters: windows large enough for a chunk in flight per stream,
/// a short idle timeout so that dead peers are found within seconds.
pub fn transport() -> Arc<quinn::TransportConfig> {
    transport_with(KEEP_ALIVE)
}

/// [`transport`] with keep-alives every `keep_alive` ([`DATA_KEEP_ALIVE`] between agents).
pub fn transport_with(keep_alive: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.keep_alive_interval(Some(keep_alive));
    t.initial_rtt(INITIAL_RTT);
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(SEND_WINDOW);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // Full-size datagrams from the start: 1452 bytes of UDP payload fit a 1500-byte Ethernet
    // MTU over IPv4 and IPv6 (quinn starts at 1200 and may take seconds to probe up); a path
    // that carries less is found by quinn's black-hole detection, which falls back to 1200.
    t.initial_mtu(INITIAL_MTU);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtud));
    // Ask the peer for one ACK per ACK_THRESHOLD packets instead of one per two (or at its
    // max_ack_delay, and at once on reordering): a relay then handles a quarter fewer packets
    // (an ACK for every two data packets, both ways), the largest CPU saving measured.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_THRESHOLD));
    t.ack_frequency_config(Some(ack));
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(INITIAL_WINDOW);
    t.congestion_controller_factory(Arc::new(cubic));
    Arc::new(t)
}

/// Binds a UDP socket with a large receive buffer and a small send buffer (see [`SEND_BUFFER`])
/// and wraps it in a quinn endpoint (the caller's tokio runtime).
pub fn bind(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    bind_on(addr, server, None)
}

/// Like [`bind`], on the tokio runtime of `on` (the caller's when `None`): the endpoint's
/// driver, its connections' drivers, their timers and the socket's readiness all run there,
/// whichever runtime later connects, accepts or reads. A relay keeps its children's endpoint
/// on a thread of its own this way (kd-agent's `--net-threads`): the upstream's packets and
/// the children's are then handled on two cores.
pub fn bind_on(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    on: Option<tokio::runtime::Handle>,
) -> std::io::Result<quinn::Endpoint> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel may clamp these to net.core.[rw]mem_max.
    let _ = sock.set_recv_buffer_size(RECV_BUFFER);
    if server.is_some() {
        // Best effort too: only with CAP_NET_ADMIN.
        let _ = nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::RcvBufForce,
            &SERVER_RECV_BUFFER,
        );
    }
    let _ = sock.set_send_buffer_size(SEND_BUFFER);
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.bind(&addr.into())?;
    let udp: UdpSocket = sock.into();
    let runtime: Arc<dyn quinn::Runtime> = match on {
        Some(h) => Arc::new(OnRuntime(h)),
        None => quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?,
    };
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(format!("QUIC endpoint configuration: {e}")))?;
    let socket = Arc::new(GsoLimit {
        inner: runtime.wrap_udp_socket(udp)?,
        largest_segment: AtomicUsize::new(0),
    });
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// quinn's tokio runtime bound to one tokio runtime by its handle (quinn's own spawns on
/// whatever runtime the caller of `connect` or `accept` is on).
#[derive(Debug)]
struct OnRuntime(tokio::runtime::Handle);

impl quinn::Runtime for OnRuntime {
    fn new_timer(&self, t: std::time::Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        let _on = self.0.enter();
        quinn::TokioRuntime.new_timer(t)
    }

    fn spawn(&self, future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(&self, t: UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _on = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(t)
    }

    fn now(&self) -> std::time::Instant {
        quinn::TokioRuntime.now()
    }
}

/// Largest UDP payload of one `sendmsg` with segmentation offload (the IPv4 total length is 16
/// bits: 65535 less the IPv4 and UDP headers).
const GSO_MAX_BYTES: usize = 65_507;

/// Datagrams of `segment` bytes that one `sendmsg` may carry, at most `max`.
fn gso_segments(segment: usize, max: usize) -> usize {
    (GSO_MAX_BYTES / segment.max(1)).clamp(1, max.max(1))
}

/// quinn's socket, with its send batches kept under 64 KiB. quinn hands up to 64 datagrams of
/// one connection to one `sendmsg` (kd's copy of quinn, `vendor/quinn`: upstream's 10 made a
/// relay pay its per-batch costs 4.5 times as often); once the batch passes 64 KiB the kernel
/// refuses it (EMSGSIZE, which quinn takes for a lost MTU probe): with jumbo datagrams every
/// batch was lost, and quinn's black-hole detection fell back to 1200-byte datagrams. So the
/// socket tells quinn how many datagrams of the largest size it has sent fit in a batch (45 of
/// 1452 bytes, 7 of 8952), and splits a batch built before it knew (the first one, and the first
/// after the path's MTU grew) on datagram boundaries.
#[derive(Debug)]
struct GsoLimit {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    /// Largest datagram sent in a batch so far.
    largest_segment: AtomicUsize,
}

impl quinn::AsyncUdpSocket for GsoLimit {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
        let Some(segment) = t.segment_size else {
            return self.inner.try_send(t);
        };
        self.largest_segment.fetch_max(segment, Ordering::Relaxed);
        if t.contents.len() <= GSO_MAX_BYTES {
            return self.inner.try_send(t);
        }
        let step = gso_segments(segment, usize::MAX) * segment;
        for (i, contents) in t.contents.chunks(step).enumerate() {
            let piece = quinn::udp::Transmit {
                destination: t.destination,
                ecn: t.ecn,
                contents,
                segment_size: (contents.len() > segment).then_some(segment),
                src_ip: t.src_ip,
            };
            match self.inner.try_send(&piece) {
                Ok(()) => {}
                // Part of the batch is out: the rest counts as lost (QUIC sends it again) rather
                // than sending the whole batch again.
                Err(e) if i > 0 && e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        let max = self.inner.max_transmit_segments();
        match self.largest_segment.load(Ordering::Relaxed) {
            0 => max,
            s => gso_segments(s, max),
        }
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A connection's path for the logs: round trip, congestion window, MTU, packets sent and lost,
/// congestion events.
pub struct PathSummary(quinn::PathStats);

/// The path of `conn` now, for the logs.
pub fn path_summary(conn: &quinn::Connection) -> PathSummary {
    PathSummary(conn.stats().path)
}

impl std::fmt::Display for PathSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.0;
        write!(
            f,
            "rtt {} us, cwnd {}, mtu {}, {} packets sent, {} lost, {} congestion events",
            p.rtt.as_micros(),
            p.cwnd,
            p.current_mtu,
            p.sent_packets,
            p.lost_packets,
            p.congestion_events
        )
    }
}

/// Logs the path of a connection that serves a stream of chunks ([`path_summary`]) at debug
/// level, at every 8th chunk (`index`): `what` names the stream.
pub fn log_conn_stats(conn: &quinn::Connection, index: u32, what: &str) {
    if !index.is_multiple_of(8) || !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    tracing::debug!(index, path = %path_summary(conn), "{what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint pinned to runtime B (its own thread) accepts and sends while the client, on
    /// runtime A, connects and reads: the relay thread's arrangement in kd-agent.
    #[test]
    fn an_endpoint_pinned_to_another_runtime_serves_from_there() {
        let b = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let on_b = b.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread_b = std::thread::Builder::new()
            .name("runtime-b".into())
            .spawn(move || {
                b.block_on(async {
                    let _ = stopped.await;
                })
            })
            .unwrap();
        let a = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        a.block_on(async {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["kd".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let der = cert.der().to_vec();
            let server = crate::tls::coordinator_server(der.clone(), key.serialize_der()).unwrap();
            // Bound from runtime A, driven by B.
            let ep = bind_on(
                "127.0.0.1:0".parse().unwrap(),
                Some(server),
                Some(on_b.clone()),
            )
            .unwrap();
            let addr = ep.local_addr().unwrap();
            let data = bytes::Bytes::from(vec![7u8; 1 << 20]);
            let sent = data.clone();
            let served = on_b.spawn(async move {
                let conn = ep.accept().await.unwrap().await.unwrap();
                let (mut s, _r) = conn.accept_bi().await.unwrap();
                let served_on = std::thread::current().name().map(String::from);
                crate::wire::send_bytes(&mut s, sent).await.unwrap();
                s.finish().unwrap();
                let _ = s.stopped().await;
                served_on
            });
            let client = bind("127.0.0.1:0".parse().unwrap(), None).unwrap();
            let cc = crate::tls::agent_to_coordinator(crate::cert_sha256(&der)).unwrap();
            let conn = client.connect_with(cc, addr, "kd").unwrap().await.unwrap();
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            s.write_all(b"hi").await.unwrap();
            let got = crate::wire::recv_bytes(&mut r, data.len()).await.unwrap();
            assert_eq!(got, data);
            conn.close(0u32.into(), b"done");
            assert_eq!(served.await.unwrap().as_deref(), Some("runtime-b"));
        });
        stop.send(()).unwrap();
        thread_b.join().unwrap();
    }

    #[test]
    fn batches_stay_under_64k() {
        // Jumbo datagrams: 7 per batch; full-size Ethernet ones: quinn's 10; never 0.
        assert_eq!(gso_segments(8952, 10), 7);
        assert_eq!(gso_segments(1452, 10), 10);
        assert_eq!(gso_segments(65_527, 10), 1);
        assert_eq!(gso_segments(0, 10), 10);
        assert!(gso_segments(8952, 10) * 8952 <= GSO_MAX_BYTES);
    }
}
