// FuzzTarget: the fuzz targets of Fuzz/, each a check of one input, and the bridge
// from libFuzzer's entry point to them.
//
// The checks live here, in the root package, rather than in the harnesses of the
// Fuzz package, so that two callers run the very same code: the libFuzzer
// harnesses (Fuzz/Sources/Fuzz*/, one `@_cdecl("LLVMFuzzerTestOneInput")` each,
// which call `FuzzTarget.fuzz`) and the plain `swift test` case
// FuzzRegressionTests, which replays Fuzz/seeds and Fuzz/regressions. A check
// throws a `FuzzViolation` instead of trapping, so the test reports which file
// broke which rule; the harness turns it into the trap libFuzzer records.

import Dispatch
import Synchronization

/// A broken rule: what failed, and on which input.
public struct FuzzViolation: Error, CustomStringConvertible, Sendable {
    public var message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { message }
}

/// Throws a ``FuzzViolation`` saying `message` when `condition` is false.
@inline(__always)
func require(_ condition: Bool, _ message: @autoclosure () -> String) throws(FuzzViolation) {
    guard condition else { throw FuzzViolation(message()) }
}

/// How an input is shown in a violation: in full when short, its size otherwise.
func describe(_ bytes: [UInt8]) -> String {
    guard bytes.count <= 256 else { return "(\(bytes.count) bytes)" }
    if let text = String(validating: bytes, as: UTF8.self), !text.contains(where: { $0.isNewline }) {
        return "\(bytes.count) bytes: \(text.debugDescription)"
    }
    return "\(bytes.count) bytes: \(bytes)"
}

/// One fuzz target: a harness in Fuzz/ and the directory name of its seeds and regressions.
public enum FuzzTarget: String, CaseIterable, Sendable {
    /// `IngestLineParser.parse`, differential against Foundation's `JSONSerialization`.
    case ingestLine = "ingest"
    /// `ClientMessage.parse`: text → an op, `bad_request` or `unknown_op`.
    case clientFrame = "client-frame"
    /// The token pre-checks of `TokenVerifier` (size, header) and what follows them.
    case token = "token"
    /// `RESPDecoder` (cluster mode's Redis replies): splits, limits, round trips.
    case resp = "resp"

    /// Checks one input; throws the first rule it breaks.
    public func check(_ input: [UInt8]) async throws(FuzzViolation) {
        switch self {
        case .ingestLine: try IngestLineOracle.check(input)
        case .clientFrame: try ClientFrameOracle.check(input)
        case .token: try await TokenOracle.check(input)
        case .resp: try RESPDecoderInvariants.check(input)
        }
    }

    /// The body of a harness's `LLVMFuzzerTestOneInput`: checks the input, traps on a violation
    /// (which libFuzzer records as a crash, saving the input). Always returns 0.
    public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
        let input = size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size))
        let outcome: Result<Void, FuzzViolation>
        switch self {
        case .ingestLine: outcome = Result { () throws(FuzzViolation) in try IngestLineOracle.check(input) }
        case .clientFrame: outcome = Result { () throws(FuzzViolation) in try ClientFrameOracle.check(input) }
        case .resp: outcome = Result { () throws(FuzzViolation) in try RESPDecoderInvariants.check(input) }
        case .token:
            // libFuzzer calls from a plain thread: wait here for the async check.
            outcome = waitFor { () async -> Result<Void, FuzzViolation> in
                do throws(FuzzViolation) {
                    try await TokenOracle.check(input)
                    return .success(())
                } catch {
                    return .failure(error)
                }
            }
        }
        if case .failure(let violation) = outcome {
            fatalError("\(self.rawValue) fuzz check failed: \(violation.message)")
        }
        return 0
    }
}

/// Runs `body` in a task and blocks the calling thread until it is done. Only for threads outside
/// Swift's concurrency pool (libFuzzer's), never from a task.
func waitFor<T: Sendable>(_ body: @escaping @Sendable () async -> T) -> T {
    let result = ResultBox<T>()
    let done = DispatchSemaphore(value: 0)
    Task {
        let value = await body()
        result.value.withLock { $0 = value }
        done.signal()
    }
    done.wait()
    return result.value.withLock { $0! }
}

/// Where `waitFor`'s task leaves its result (a Mutex cannot be captured by itself).
private final class ResultBox<T: Sendable>: Sendable {
    let value = Mutex<T?>(nil)
}
