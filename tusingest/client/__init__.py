"""`tusingest upload`: a resumable tus 1.0 client for any tus server (ours, tusd, @tus/server).

It knows the server only through the protocol and our ArtStore-* answer headers; it imports no server part."""
