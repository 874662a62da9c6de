// Shared helpers of the RESP tests: value shorthands, a seeded generator, and a
// feeder that hands bytes to a decoder in given pieces the way a
// ByteToMessageHandler does (append to one cumulation buffer, decode until nil).

import NIOCore
import Testing

@testable import RESP

func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

func bulk(_ text: String) -> RESPValue { .bulkString(ByteBuffer(string: text)) }
func bulk(_ bytes: [UInt8]) -> RESPValue { .bulkString(ByteBuffer(bytes: bytes)) }
func simple(_ text: String) -> RESPValue { .simpleString(ByteBuffer(string: text)) }
func error(_ text: String) -> RESPValue { .error(ByteBuffer(string: text)) }

func encoded(_ value: RESPValue) -> [UInt8] {
    var buffer = ByteBuffer()
    value.encode(into: &buffer)
    return Array(buffer.readableBytesView)
}

/// Deterministic generator, so that random tests are reproducible.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// What a decoder made of a byte stream: the values in order, the error that stopped it (if
/// any), and how many bytes it left unread.
struct Outcome: Equatable, CustomStringConvertible {
    var values: [RESPValue] = []
    var error: RESPError?
    var leftover = 0
    /// Calls that broke the decoder's contract (moved the reader index yet returned nil, or
    /// returned a value without consuming bytes).
    var contractViolations = 0

    var description: String {
        "values \(values), error \(error.map(String.init(describing:)) ?? "none"), leftover \(leftover)"
            + (contractViolations > 0 ? ", \(contractViolations) contract violations" : "")
    }
}

/// Feeds `input` to a fresh decoder in pieces ending at `cuts` (sorted offsets; the end of the
/// input is always a cut), appending each piece to one cumulation buffer and decoding until nil
/// after each append. With `compact`, read bytes are discarded between pieces, as
/// `ByteToMessageHandler` does, which moves the unread bytes to the front of the storage.
func feed(
    _ input: [UInt8], cuts: [Int] = [], decoder: RESPDecoder = RESPDecoder(), compact: Bool = false
) -> Outcome {
    var decoder = decoder
    var outcome = Outcome()
    var cumulation = ByteBuffer()
    var start = 0
    for cut in cuts + [input.count] where cut >= start {
        cumulation.writeBytes(input[start..<cut])
        start = cut
        while true {
            let readerIndex = cumulation.readerIndex
            let readable = cumulation.readableBytes
            do {
                guard let value = try decoder.decode(buffer: &cumulation) else {
                    if cumulation.readerIndex != readerIndex || cumulation.readableBytes != readable {
                        outcome.contractViolations += 1
                    }
                    break
                }
                if cumulation.readableBytes >= readable { outcome.contractViolations += 1 }
                outcome.values.append(value)
            } catch let error as RESPError {
                if cumulation.readerIndex != readerIndex { outcome.contractViolations += 1 }
                outcome.error = error
                outcome.leftover = cumulation.readableBytes + (input.count - start)
                return outcome
            } catch {
                Issue.record("unexpected error type \(error)")
                return outcome
            }
        }
        if compact { cumulation.discardReadBytes() }
    }
    outcome.leftover = cumulation.readableBytes
    return outcome
}

/// Feeds `input` one byte at a time.
func feedByteByByte(_ input: [UInt8], decoder: RESPDecoder = RESPDecoder(), compact: Bool = false) -> Outcome {
    feed(input, cuts: Array(0..<input.count), decoder: decoder, compact: compact)
}

extension RESPValue {
    /// Nesting depth: 0 for a scalar, 1 for an array of scalars.
    var depth: Int {
        if case .array(let elements?) = self { return 1 + (elements.map(\.depth).max() ?? 0) }
        if case .array(nil) = self { return 1 }
        return 0
    }
}
