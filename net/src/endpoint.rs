//! QUIC endpoints with kd's transport parameters.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

/// Idle time after which a silent peer is declared gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive interval (well under [`IDLE_TIMEOUT`]).
pub const KEEP_ALIVE: Duration = Duration::from_millis(2000);
/// UDP socket buffer size asked of the kernel (the default loses packets on loopback).
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// kd's QUIC transport parameters: windows large enough for a chunk in flight per stream,
/// a short idle timeout so that dead peers are found within seconds.
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Arc::new(t)
}

/// Binds a UDP socket with large buffers and wraps it in a quinn endpoint (tokio runtime).
pub fn bind(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel may clamp these to net.core.[rw]mem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.bind(&addr.into())?;
    let udp: UdpSocket = sock.into();
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, udp, runtime)
}
