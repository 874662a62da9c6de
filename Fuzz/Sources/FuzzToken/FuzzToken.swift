// FuzzToken: a token → TokenVerifier's pre-checks (size, then the header read
// before any signature is checked) and what follows them. The first byte picks
// a raw token or a header and payload signed with the verifier's key. The rules
// are in Sources/FuzzChecks/TokenOracle.swift.

import FuzzChecks

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzToken(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzTarget.token.fuzz(data, size)
}
