//! Subcommands of the `warren` command line with enough of their own code to deserve a file.

pub(crate) mod funnel;
