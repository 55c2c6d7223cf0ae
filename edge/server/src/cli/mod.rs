//! Subcommands of `warren-edge` besides serving.

pub(crate) mod token;
