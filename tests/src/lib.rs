//! End-to-end tests (none yet).
