//! End-to-end tests for tagstream.
