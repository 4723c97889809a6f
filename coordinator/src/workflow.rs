//! Deployment workflow state machine (being written).
