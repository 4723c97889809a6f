//! ClusterShell-style node sets. (Being written.)
