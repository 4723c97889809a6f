//! Broadcast tree planner. (Being written.)
