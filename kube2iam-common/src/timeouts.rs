//! How long the agent waits for what is outside the node. Here rather than in the agent so the
//! fault tests, which do not link the agent, hold it to the same values.

use core::time::Duration;

/// Upstream requests (and the agent's own IMDS calls) give up after this.
pub const UPSTREAM: Duration = Duration::from_secs(3);
/// The agent's STS client: connecting to STS gives up after this,
pub const STS_CONNECT: Duration = Duration::from_secs(2);
/// one attempt of an STS call after this,
pub const STS_ATTEMPT: Duration = Duration::from_secs(5);
/// and an STS call with all its retries after this.
pub const STS_OPERATION: Duration = Duration::from_secs(15);
