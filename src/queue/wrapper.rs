//! The internal wrapper.
