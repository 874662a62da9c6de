// FuzzRESP: bytes from Redis → RESPDecoder, whole, split and byte by byte, with
// tight limits, re-encoded. The invariants are in
// Sources/FuzzChecks/RESPDecoderInvariants.swift.

import FuzzChecks

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzRESP(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzTarget.resp.fuzz(data, size)
}
