// FuzzRegressionTests: every committed input of the fuzz targets in Fuzz/ (the
// hand-written seeds in Fuzz/seeds/<target>/, and in Fuzz/regressions/<target>/
// the inputs that once broke a check) through the same checks the harnesses run
// (FuzzChecks), in a plain `swift test`: a crash the fuzzer found stays fixed,
// without building the fuzzers.

import Foundation
import Testing

@testable import FuzzChecks

/// The checkout's Fuzz/ directory, found from this file's path.
private let fuzzDirectory = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Fuzz")

/// The files of Fuzz/<kind>/<target>/, sorted; none when the directory does not exist.
private func inputs(_ kind: String, _ target: FuzzTarget) -> [URL] {
    let directory = fuzzDirectory.appendingPathComponent(kind).appendingPathComponent(target.rawValue)
    let names = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
    return names.filter { !$0.hasPrefix(".") }.sorted().map { directory.appendingPathComponent($0) }
}

@Suite("Fuzz regressions and seeds")
struct FuzzRegressionTests {
    @Test("Every regression input passes its target's checks", arguments: FuzzTarget.allCases)
    func regressions(target: FuzzTarget) async throws {
        for file in inputs("regressions", target) {
            await expectChecksPass(target, file)
        }
    }

    @Test("Every seed passes its target's checks", arguments: FuzzTarget.allCases)
    func seeds(target: FuzzTarget) async throws {
        let files = inputs("seeds", target)
        #expect(!files.isEmpty, "no seeds in Fuzz/seeds/\(target.rawValue)")
        for file in files {
            await expectChecksPass(target, file)
        }
    }

    /// The oracles catch a wrong answer: handed a parser result that is not the right one, they throw.
    @Test func theOraclesRejectWrongAnswers() throws {
        let line = Array(#"{"topic":"a","type":"t"}"#.utf8)
        let object = try JSONSerialization.jsonObject(with: Data(line))
        #expect(throws: FuzzViolation.self) {
            try IngestLineOracle.checkAgainstFoundation(line, .failure(.missingTopic), object)
        }
        #expect(throws: FuzzViolation.self) {
            try IngestLineOracle.checkUTF8([0xC0, 0x80], .failure(.invalidJSON))  // overlong NUL
        }
        #expect(ClientFrameOracle.expectation(Array(#"{"op":"subscribe"}"#.utf8)) == .badRequest)
        #expect(ClientFrameOracle.expectation(Array(#"{"op":"x","topic":1}"#.utf8)) == .badRequest)
        #expect(ClientFrameOracle.expectation(Array(#"{"op":"x"}"#.utf8)) == .unknownOp("x"))
        #expect(TokenOracle.strictBase64URL("eyJhIjoxfQ") == Array(#"{"a":1}"#.utf8))
        #expect(TokenOracle.strictBase64URL("eyJhIjoxfQ=") == nil)
    }

    /// The allowed disagreements are recognised, and nothing else is.
    @Test func allowedDisagreements() {
        #expect(IngestLineOracle.foundationOnlyReason(Array(#"{"topic":"a",}"#.utf8)) != nil)
        #expect(IngestLineOracle.foundationOnlyReason([0xEF, 0xBB, 0xBF] + Array(#"{"topic":"a"}"#.utf8)) != nil)
        #expect(IngestLineOracle.foundationOnlyReason(Array(#"{"topic":"a"}x"#.utf8)) == nil)
        #expect(IngestLineOracle.relayOnlyReason(Array(#"{"topic":"a","n":1e999}"#.utf8)) != nil)
        #expect(IngestLineOracle.relayOnlyReason(Array(#"{"topic":"a","b":true,"n":-1e999}"#.utf8)) != nil)
        #expect(IngestLineOracle.relayOnlyReason(Array(#"{"topic":"a","n":1}"#.utf8)) == nil)
        #expect(
            IngestLineOracle.replacingBOMsInStrings(Array("\u{FEFF}{\"\u{FEFF}topic\":\"\\uFEFFa\\/\u{FEFF}\"}".utf8))
                == Array("\u{FEFF}{\"\u{2060}topic\":\"\\u2060a\\/\u{2060}\"}".utf8))
        #expect(IngestLineOracle.relayOnlyReason(Array(#"{"topic":"a","n":1e999"#.utf8)) == nil)
    }

    private func expectChecksPass(_ target: FuzzTarget, _ file: URL) async {
        guard let data = FileManager.default.contents(atPath: file.path) else {
            Issue.record("cannot read \(file.path)")
            return
        }
        do {
            try await target.check(Array(data))
        } catch {
            Issue.record("\(target.rawValue) \(file.lastPathComponent): \(error.message)")
        }
    }
}
