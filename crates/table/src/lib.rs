//! The Hopscotch table of hopps (being written).
