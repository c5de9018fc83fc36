//! gRPC status codes by name, as `retry.on` spells them and metrics label them: the 17 codes
//! of the gRPC spec (doc/statuscodes.md), lowercase and hyphenated (`deadline-exceeded`).
//! Here, not in the proxy, because the YAML names them; the proxy reads them off the wire.

use std::fmt;

/// A gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrpcStatus {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcStatus {
    /// Every code, by number.
    pub const ALL: [GrpcStatus; 17] = [
        Self::Ok,
        Self::Cancelled,
        Self::Unknown,
        Self::InvalidArgument,
        Self::DeadlineExceeded,
        Self::NotFound,
        Self::AlreadyExists,
        Self::PermissionDenied,
        Self::ResourceExhausted,
        Self::FailedPrecondition,
        Self::Aborted,
        Self::OutOfRange,
        Self::Unimplemented,
        Self::Internal,
        Self::Unavailable,
        Self::DataLoss,
        Self::Unauthenticated,
    ];

    /// The codes `retry.on` accepts: those a server may answer to a call worth repeating.
    /// `ok` and the caller's own mistakes (`invalid-argument`, `not-found`, …) are not.
    pub const RETRYABLE: [GrpcStatus; 8] = [
        Self::Cancelled,
        Self::Unknown,
        Self::DeadlineExceeded,
        Self::ResourceExhausted,
        Self::Aborted,
        Self::Internal,
        Self::Unavailable,
        Self::DataLoss,
    ];

    /// The code numbered `code`, if there is one.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(code).ok()?).copied()
    }

    pub fn code(self) -> u32 {
        self as u32
    }

    /// The lowercase, hyphenated name: `deadline-exceeded`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Cancelled => "cancelled",
            Self::Unknown => "unknown",
            Self::InvalidArgument => "invalid-argument",
            Self::DeadlineExceeded => "deadline-exceeded",
            Self::NotFound => "not-found",
            Self::AlreadyExists => "already-exists",
            Self::PermissionDenied => "permission-denied",
            Self::ResourceExhausted => "resource-exhausted",
            Self::FailedPrecondition => "failed-precondition",
            Self::Aborted => "aborted",
            Self::OutOfRange => "out-of-range",
            Self::Unimplemented => "unimplemented",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::DataLoss => "data-loss",
            Self::Unauthenticated => "unauthenticated",
        }
    }

    /// The code named `name` (as [`name`](Self::name) spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for GrpcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for (n, status) in GrpcStatus::ALL.into_iter().enumerate() {
            assert_eq!(status.code() as usize, n);
            assert_eq!(GrpcStatus::from_code(status.code()), Some(status));
            assert_eq!(GrpcStatus::from_name(status.name()), Some(status));
        }
        assert_eq!(GrpcStatus::from_code(17), None);
        assert_eq!(GrpcStatus::Unavailable.name(), "unavailable");
        assert_eq!(GrpcStatus::from_name("UNAVAILABLE"), None);
    }
}
