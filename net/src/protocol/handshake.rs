//! The version handshake: what an acceptor accepts, and what a dialer checks in the answer.

use super::*;

/// What this engine accepts in a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakePolicy {
    /// Lowest protocol version spoken.
    pub version_min: u16,
    /// Highest protocol version spoken.
    pub version_max: u16,
    /// This engine's role; the peer must have the other.
    pub role: Role,
}

impl HandshakePolicy {
    /// The versions this build speaks, in `role`.
    pub fn current(role: Role) -> HandshakePolicy {
        HandshakePolicy {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            role,
        }
    }

    fn refuse(&self, reason: RefuseReason) -> Refuse {
        Refuse {
            reason,
            version_min: self.version_min,
            version_max: self.version_max,
        }
    }
}

/// A `Hello` the acceptor can serve, as far as the protocol alone can tell; whether a
/// joined session exists and its token matches is the session table's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The highest protocol version both ends speak.
    pub version: u16,
    /// Open or join.
    pub intent: Intent,
    /// The session named.
    pub session_id: SessionId,
    /// The token presented (none on `Open`).
    pub resume_token: ResumeToken,
    /// The connection's index in the session.
    pub connection_index: u16,
}

/// The acceptor's check of a `Hello` (step 2): the `Refuse` to send, or what was agreed.
pub fn negotiate(hello: &Hello, local: &HandshakePolicy) -> Result<Negotiated, Refuse> {
    if hello.version_min > hello.version_max {
        return Err(local.refuse(RefuseReason::InvalidHello));
    }
    let version = hello.version_max.min(local.version_max);
    if version < hello.version_min.max(local.version_min) {
        return Err(local.refuse(RefuseReason::VersionMismatch));
    }
    if hello.role == local.role {
        return Err(local.refuse(RefuseReason::RoleConflict));
    }
    let consistent = !hello.session_id.is_zero()
        && match hello.intent {
            Intent::Open => hello.connection_index == 0 && hello.resume_token.is_none(),
            Intent::Join => {
                (1..MAX_CONNECTIONS_PER_SESSION).contains(&hello.connection_index)
                    && !hello.resume_token.is_none()
            }
        };
    if !consistent {
        return Err(local.refuse(RefuseReason::InvalidHello));
    }
    Ok(Negotiated {
        version,
        intent: hello.intent,
        session_id: hello.session_id,
        resume_token: hello.resume_token,
        connection_index: hello.connection_index,
    })
}

/// Why the dialer's handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The acceptor refused.
    #[error("peer refused the session: {reason}; peer supports protocol versions {peer_min}..={peer_max}, we support {local_min}..={local_max}")]
    Refused {
        /// The acceptor's reason.
        reason: RefuseReason,
        /// Lowest version the acceptor speaks.
        peer_min: u16,
        /// Highest version the acceptor speaks.
        peer_max: u16,
        /// Lowest version we speak.
        local_min: u16,
        /// Highest version we speak.
        local_max: u16,
    },
    /// The acceptor answered with something other than `HelloAck` or `Refuse`.
    #[error("expected HelloAck or Refuse, got {frame_type:?}")]
    UnexpectedFrame {
        /// What came instead.
        frame_type: FrameType,
    },
    /// The acceptor chose a version outside what either end offered.
    #[error("peer chose protocol version {version}, outside the offered {min}..={max}")]
    Version {
        /// The version chosen.
        version: u16,
        /// Lowest offered.
        min: u16,
        /// Highest offered.
        max: u16,
    },
    /// The acceptor has the same role as we do.
    #[error("peer has our role {role:?}")]
    RoleConflict {
        /// The shared role.
        role: Role,
    },
    /// The `HelloAck` does not echo the session and connection index we sent.
    #[error("HelloAck does not match our Hello (session or connection index)")]
    Mismatch,
    /// The token is missing, or changed on a join.
    #[error("HelloAck carries a missing or changed resume token")]
    Token,
    /// The acceptor admits more connections than the protocol allows, or fewer than the
    /// index it just accepted.
    #[error(
        "peer admits {connections_max} connections, outside 1..={MAX_CONNECTIONS_PER_SESSION}"
    )]
    ConnectionsMax {
        /// The number announced.
        connections_max: u16,
    },
}

/// The dialer's check of the acceptor's answer to `sent` (step 2).
pub fn check_hello_ack(
    sent: &Hello,
    reply: &Frame,
    local: &HandshakePolicy,
) -> Result<HelloAck, HandshakeError> {
    let ack = match reply {
        Frame::HelloAck(ack) => ack,
        Frame::Refuse(r) => {
            return Err(HandshakeError::Refused {
                reason: r.reason,
                peer_min: r.version_min,
                peer_max: r.version_max,
                local_min: local.version_min,
                local_max: local.version_max,
            })
        }
        other => {
            return Err(HandshakeError::UnexpectedFrame {
                frame_type: other.frame_type(),
            })
        }
    };
    let (min, max) = (sent.version_min, sent.version_max);
    if !(min..=max).contains(&ack.version) {
        return Err(HandshakeError::Version {
            version: ack.version,
            min,
            max,
        });
    }
    if ack.role == sent.role {
        return Err(HandshakeError::RoleConflict { role: ack.role });
    }
    if ack.session_id != sent.session_id || ack.connection_index != sent.connection_index {
        return Err(HandshakeError::Mismatch);
    }
    let token_ok = match sent.intent {
        Intent::Open => !ack.resume_token.is_none(),
        Intent::Join => ack.resume_token.matches(&sent.resume_token),
    };
    if !token_ok {
        return Err(HandshakeError::Token);
    }
    let connections_max = ack.connections_max;
    if connections_max <= ack.connection_index || connections_max > MAX_CONNECTIONS_PER_SESSION {
        return Err(HandshakeError::ConnectionsMax { connections_max });
    }
    Ok(*ack)
}
