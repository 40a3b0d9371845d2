//! Reading Envoy's admin interface, for everything that starts an Envoy and waits on it
//! (`unbusy up`, the tests' harness): the request to send and how to read the answer. Only
//! the bytes; each caller does its own I/O (blocking or async).

use serde_json::Value;
use std::net::SocketAddr;

/// The bytes of a `GET path` on the admin interface, closing the connection after the answer
/// (so the answer is everything read until the end).
pub fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
}

/// The status and body of a complete HTTP/1.1 answer read until the connection closed: a
/// chunked body joined, anything malformed `None`.
pub fn read_answer(answer: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some((status, body))
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// The address the listener `name` bound, from `/listeners?format=json`; `None` until it is
/// bound (port 0 still).
pub fn listener_address(listeners: &Value, name: &str) -> Option<SocketAddr> {
    let listener = listeners
        .get("listener_statuses")?
        .as_array()?
        .iter()
        .find(|l| l.get("name").and_then(Value::as_str) == Some(name))?;
    let a = listener.get("local_address")?.get("socket_address")?;
    let ip: std::net::IpAddr = a.get("address")?.as_str()?.parse().ok()?;
    let port = u16::try_from(a.get("port_value")?.as_u64()?).ok()?;
    (port != 0).then_some(SocketAddr::new(ip, port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_listeners_bound_address_is_read_and_port_zero_is_not_bound() {
        let status = |port: u64| {
            serde_json::json!({"listener_statuses": [
                {"name": "other", "local_address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}},
                {"name": "unbusy", "local_address": {"socket_address": {"address": "::1", "port_value": port}}},
            ]})
        };
        assert_eq!(
            listener_address(&status(43121), "unbusy"),
            Some("[::1]:43121".parse().unwrap())
        );
        assert_eq!(
            listener_address(&status(43121), "other"),
            Some("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(listener_address(&status(0), "unbusy"), None);
        assert_eq!(listener_address(&serde_json::json!({}), "unbusy"), None);
    }

    #[test]
    fn answers_are_read_plain_or_chunked_and_malformed_ones_refused() {
        assert_eq!(
            read_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Some((200, "ok".into()))
        );
        assert_eq!(
            read_answer(
                b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
            ),
            Some((503, "abcde".into()))
        );
        assert_eq!(
            read_answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab"),
            None
        );
        assert_eq!(read_answer(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(read_answer(b"HTTP/1.1 abc\r\n\r\n"), None);
        assert!(get_request("/ready").starts_with("GET /ready HTTP/1.1\r\n"));
    }
}
