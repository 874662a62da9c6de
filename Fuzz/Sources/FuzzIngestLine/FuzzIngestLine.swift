// FuzzIngestLine: one ingest line (bytes, no newline) → IngestLineParser.parse,
// differential against Foundation's JSONSerialization. The rules are in
// Sources/FuzzChecks/IngestLineOracle.swift; disagreements allowed (Swift 6.3.1):
//
//   Foundation accepts, relay rejects        relay accepts, Foundation rejects
//   - a leading BOM                          - a number out of Double's range (1e999)
//   - a trailing comma                       - a lone surrogate escape (\ud800 → U+FFFD)
//   - UTF-16/UTF-32 (NULs in the first
//     4 bytes, a UTF-16 BOM)
//   - nesting deeper than 512
//   - duplicate topic or type keys
//   and Foundation drops U+FEFF in strings (at their start, after an escape: "\u{FEFF}topic" is topic):
//   such lines are compared again with U+2060 there.

import FuzzChecks

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzIngestLine(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    FuzzTarget.ingestLine.fuzz(data, size)
}
