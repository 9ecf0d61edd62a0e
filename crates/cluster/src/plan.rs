//! Placement planning (written next).
