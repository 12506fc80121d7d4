//! An h2c upgrade attempt (`Upgrade: h2c` over HTTP/1.1), which the mesh must refuse: the
//! upgrade has a request-smuggling history.

use std::fmt;

use tokio::io::{AsyncWriteExt, BufReader};

use super::http1::{HttpResponse, read_response_body, read_response_head};
use super::{connect, timed};

/// `HTTP2-Settings` of the upgrade request: base64url of a SETTINGS payload
/// (`MAX_CONCURRENT_STREAMS` 100, `INITIAL_WINDOW_SIZE` 1 GiB, `ENABLE_PUSH` 0).
const H2_SETTINGS: &str = "AAMAAABkAARAAAAAAAIAAAAA";

/// `GET path` with `Connection: Upgrade, HTTP2-Settings`, `Upgrade: h2c` and
/// `HTTP2-Settings`; returns the response as it arrived (a `101` without reading past its
/// head). Tests expect anything but `101`.
pub async fn h2c_upgrade(addr: impl fmt::Display, path: &str) -> anyhow::Result<HttpResponse> {
    timed(format!("h2c upgrade attempt to {addr}"), async {
        let mut tcp = BufReader::new(connect(&addr.to_string()).await?);
        let head = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: Upgrade, HTTP2-Settings\r\n\
             upgrade: h2c\r\nhttp2-settings: {H2_SETTINGS}\r\n\r\n"
        );
        tcp.get_mut().write_all(head.as_bytes()).await?;
        let mut resp = read_response_head(&mut tcp).await?;
        while (100..200).contains(&resp.status) && resp.status != 101 {
            resp = read_response_head(&mut tcp).await?;
        }
        if resp.status != 101 {
            read_response_body(&mut tcp, &mut resp).await?;
        }
        Ok(resp)
    })
    .await
}
