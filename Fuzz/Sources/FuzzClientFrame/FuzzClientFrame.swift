// FuzzClientFrame: a subscriber's text message → ClientMessage.parse: an op,
// bad_request or unknown_op, as the contract reads the same JSON with
// JSONSerialization. The rules are in Sources/FuzzChecks/ClientFrameOracle.swift.

import FuzzChecks

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzClientFrame(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzTarget.clientFrame.fuzz(data, size)
}
