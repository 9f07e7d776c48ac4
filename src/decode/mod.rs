//! Decoding: bytes of a source → validated events, or quarantine records with reasons.
