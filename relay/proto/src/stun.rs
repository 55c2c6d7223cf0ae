//! STUN (RFC 8489) Binding: the responder a relay runs on UDP 3478, and the client side.
//!
//! A node sends a Binding request; the relay answers with a success response carrying the
//! source address it saw in XOR-MAPPED-ADDRESS, so the node learns its public (reflexive)
//! address. Parsing and encoding are done by `stun-rs`; this module only decides what to answer.

use std::net::SocketAddr;

use stun_rs::attributes::stun::{Fingerprint, Software, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder, TransactionId};

/// Largest datagram worth parsing; Binding requests are far smaller.
pub const MAX_STUN_DATAGRAM: usize = 1024;

/// Why a datagram got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StunError {
    /// Not a STUN message (or a truncated, oversized or corrupt one).
    #[error("not a valid STUN message")]
    Malformed,
    /// A valid STUN message that is not a Binding request.
    #[error("not a Binding request")]
    NotBindingRequest,
    /// A response could not be encoded (should not happen).
    #[error("failed to encode the STUN response")]
    Encode,
}

impl StunError {
    /// A short stable name, for use as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            StunError::Malformed => "malformed",
            StunError::NotBindingRequest => "not_binding",
            StunError::Encode => "encode",
        }
    }
}

/// Builds the Binding success response to `request` received from `from`.
///
/// # Errors
/// [`StunError::Malformed`] for anything that is not a well-formed STUN message,
/// [`StunError::NotBindingRequest`] for other methods or classes.
pub fn binding_response(request: &[u8], from: SocketAddr) -> Result<Vec<u8>, StunError> {
    if request.len() > MAX_STUN_DATAGRAM {
        return Err(StunError::Malformed);
    }
    let decoder = MessageDecoderBuilder::default().build();
    let (msg, _) = decoder.decode(request).map_err(|_| StunError::Malformed)?;
    if msg.method() != BINDING || msg.class() != MessageClass::Request {
        return Err(StunError::NotBindingRequest);
    }
    let software = Software::new("warren").map_err(|_| StunError::Encode)?;
    let response = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(*msg.transaction_id())
        .with_attribute(XorMappedAddress::from(from))
        .with_attribute(software)
        .with_attribute(Fingerprint::default())
        .build();
    encode(&response)
}

/// Encodes a Binding request with the given transaction id (client side).
///
/// # Errors
/// [`StunError::Encode`] if encoding fails (should not happen).
pub fn binding_request(transaction_id: [u8; 12]) -> Result<Vec<u8>, StunError> {
    let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(transaction_id))
        .with_attribute(Fingerprint::default())
        .build();
    encode(&msg)
}

/// Parses a Binding success response: its transaction id and the mapped address (client side).
///
/// # Errors
/// [`StunError::Malformed`] if it is not a Binding success response with XOR-MAPPED-ADDRESS.
pub fn parse_binding_response(response: &[u8]) -> Result<([u8; 12], SocketAddr), StunError> {
    if response.len() > MAX_STUN_DATAGRAM {
        return Err(StunError::Malformed);
    }
    let decoder = MessageDecoderBuilder::default().build();
    let (msg, _) = decoder.decode(response).map_err(|_| StunError::Malformed)?;
    if msg.method() != BINDING || msg.class() != MessageClass::SuccessResponse {
        return Err(StunError::Malformed);
    }
    let addr = msg
        .get::<XorMappedAddress>()
        .and_then(|a| a.as_xor_mapped_address().ok())
        .map(|a| *a.socket_address())
        .ok_or(StunError::Malformed)?;
    Ok((*msg.transaction_id().as_bytes(), addr))
}

fn encode(msg: &stun_rs::StunMessage) -> Result<Vec<u8>, StunError> {
    let mut buf = [0u8; 256];
    let n = MessageEncoderBuilder::default().build().encode(&mut buf, msg).map_err(|_| StunError::Encode)?;
    Ok(buf[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_round_trip_v4_and_v6() {
        for from in ["192.0.2.1:32853", "[2001:db8::1]:443"] {
            let from: SocketAddr = from.parse().expect("addr");
            let req = binding_request([7; 12]).expect("encodes");
            let resp = binding_response(&req, from).expect("answers");
            assert_eq!(parse_binding_response(&resp), Ok(([7; 12], from)));
        }
    }

    #[test]
    fn rfc5769_request_vector_is_answered() {
        // RFC 5769 §2.1 sample request (short-term credentials; integrity is not checked here).
        let req = hex::decode(concat!(
            "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74",
            "002400046e0001ff80290008932ff9b151263b36000600096576746a3a683676590000000008",
            "00149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf"
        ))
        .expect("hex");
        let from: SocketAddr = "198.51.100.7:4000".parse().expect("addr");
        let resp = binding_response(&req, from).expect("answers");
        let (tx, addr) = parse_binding_response(&resp).expect("parses");
        assert_eq!(&tx[..], &req[8..20]);
        assert_eq!(addr, from);
    }

    #[test]
    fn garbage_and_non_requests_are_refused() {
        let from: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert_eq!(binding_response(b"hello", from), Err(StunError::Malformed));
        assert_eq!(binding_response(&[0u8; 2000], from), Err(StunError::Malformed));
        let resp = binding_response(&binding_request([1; 12]).expect("req"), from).expect("resp");
        assert_eq!(binding_response(&resp, from), Err(StunError::NotBindingRequest));
        let mut truncated = binding_request([2; 12]).expect("req");
        truncated.truncate(truncated.len() - 3);
        assert!(binding_response(&truncated, from).is_err());
    }
}
