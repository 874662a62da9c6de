// RESPDecoderInvariants: what must hold for any bytes given to RESPDecoder (the
// FuzzRESP target; moved here from the root's former resp-fuzz executable). A
// violation throws a FuzzViolation, which the harness turns into a trap.
//
// Each input is decoded as a stream of replies, by a decoder with the default
// limits and by one with tiny limits derived from the input, and:
//
//  * in one piece, at cut points derived from the input, one byte at a time,
//    and in one piece with hidden bytes after the buffer's writer index, it
//    gives the same values, the same error at the same offset, and the same
//    unread bytes (so no byte past the input is ever read, and nothing depends
//    on how the stream was split);
//  * every call keeps the decoder's contract: nil or an error leave the reader
//    index alone, a value moves it forward by exactly the bytes of that value;
//    an error's offset is a byte that is present; the values plus the bytes
//    left unread account for the whole input;
//  * no value exceeds the decoder's limits, and the tiny limits only ever cut
//    the stream short where a value really exceeds them (same values before,
//    the same syntax errors);
//  * every value, encoded again, decodes to itself, in no more bytes than it
//    took the first time;
//  * RESPValueDecoder.decodeLast refuses a reply cut short by the end of the stream;
//  * a decoder waiting for the rest of a reply, then shown fewer bytes (a broken
//    contract), does not trap, and waits on a shorter prefix of that reply.
//
// Out-of-bounds accesses of the buffers trap by themselves (ByteBuffer's bounds
// checks stay in release builds; AddressSanitizer watches the rest).

import NIOCore
import RESP

enum RESPDecoderInvariants {
    /// Checks every invariant on `input`; traps on the first that fails.
    static func check(_ input: [UInt8]) throws(FuzzViolation) {
        var random = SplitMix64(state: fnv1a(input))
        let loose = RESPDecoder()
        let tight = RESPDecoder(
            maximumDepth: random.int(in: 0...4),
            maximumArrayLength: random.int(in: 0...5),
            maximumBulkLength: random.int(in: 0...24),
            maximumLineLength: random.int(in: 0...12)
        )

        let outcomes = [
            try checkSplits(input, decoder: loose, random: &random),
            try checkSplits(input, decoder: tight, random: &random),
        ]
        try checkTightAgainstLoose(input, tight: outcomes[1], loose: outcomes[0], limits: tight)
        try checkRoundTrip(outcomes[0])
        try checkDecodeLast(input, outcome: outcomes[0])
        try checkShrunkBuffer(input, outcome: outcomes[0], random: &random)
    }

    /// Decodes `input` split in several ways; all must agree. Returns the outcome.
    static func checkSplits(_ input: [UInt8], decoder: RESPDecoder, random: inout SplitMix64) throws(FuzzViolation) -> Outcome {
        let whole = try feed(input, decoder: decoder)
        try requireRESP(
            whole.consumed.reduce(0, +) + whole.leftover == input.count,
            "the values and the unread bytes do not add up to the input", input, whole)
        for value in whole.values {
            try requireRESP(withinLimits(value, decoder), "value beyond the limits \(limits(decoder)): \(value)", input, whole)
        }

        let cuts = (0..<random.int(in: 1...3)).map { _ in random.int(in: 0...input.count) }.sorted()
        let compact = random.int(in: 0...1) == 1
        let split = try feed(input, cuts: cuts, decoder: decoder, compact: compact)
        try requireRESP(split == whole, "cut at \(cuts) (compacting: \(compact)): \(split)", input, whole)

        let byteByByte = try feed(input, cuts: Array(0..<input.count), decoder: decoder, compact: !compact)
        try requireRESP(byteByByte == whole, "byte by byte: \(byteByByte)", input, whole)

        let hidden = try feed(input, decoder: decoder, hiddenTrailer: true)
        try requireRESP(hidden == whole, "with bytes hidden past the writer index: \(hidden)", input, whole)
        return whole
    }

    /// The tiny limits may only stop the stream at a value that exceeds them.
    static func checkTightAgainstLoose(_ input: [UInt8], tight: Outcome, loose: Outcome, limits: RESPDecoder) throws(FuzzViolation) {
        let decoded = tight.values.count
        try requireRESP(
            decoded <= loose.values.count && Array(loose.values.prefix(decoded)) == tight.values
                && Array(loose.consumed.prefix(decoded)) == tight.consumed,
            "tight limits decode other values: \(tight) vs \(loose)", input, tight)
        guard let error = tight.error, error.reason.isLimit else {
            // No limit was reached, so the limits made no difference.
            try requireRESP(tight == loose, "tight limits, no limit reached, yet \(tight) vs \(loose)", input, tight)
            return
        }
        if decoded < loose.values.count {
            try requireRESP(
                !withinLimits(loose.values[decoded], limits),
                "\(error) for a value within \(self.limits(limits)): \(loose.values[decoded])", input, tight)
        }
    }

    /// Every value decodes again, from its canonical encoding, to itself.
    static func checkRoundTrip(_ outcome: Outcome) throws(FuzzViolation) {
        for (value, consumed) in zip(outcome.values, outcome.consumed) {
            var buffer = ByteBuffer()
            value.encode(into: &buffer)
            let encoded = Array(buffer.readableBytesView)
            try requireRESP(encoded.count <= consumed, "\(value) re-encoded is longer than it was: \(encoded)", encoded, outcome)
            let again = try feed(encoded, decoder: RESPDecoder())
            try requireRESP(
                again.values == [value] && again.consumed == [encoded.count] && again.error == nil,
                "\(value) re-encoded decodes to \(again)", encoded, outcome)
        }
    }

    /// At the end of the stream, a partial reply is leftover data, and no reply is not.
    static func checkDecodeLast(_ input: [UInt8], outcome: Outcome) throws(FuzzViolation) {
        guard outcome.error == nil else { return }
        var decoder = RESPValueDecoder()
        var buffer = ByteBuffer(bytes: input)
        do {
            while try decoder.decode(buffer: &buffer) != nil {}
            let last = try decoder.decodeLast(buffer: &buffer, seenEOF: true)
            try requireRESP(last == nil && outcome.leftover == 0, "decodeLast gave \(String(describing: last))", input, outcome)
        } catch let violation as FuzzViolation {
            throw violation
        } catch ByteToMessageDecoderError.leftoverDataWhenDone {
            try requireRESP(outcome.leftover > 0, "decodeLast: leftover data when there was none", input, outcome)
        } catch {
            try requireRESP(false, "decodeLast threw \(error)", input, outcome)
        }
    }

    /// A decoder waiting for the rest of a reply is handed fewer bytes than it has checked (which
    /// breaks its contract): it must not trap, and on a prefix of that reply it must wait again.
    static func checkShrunkBuffer(_ input: [UInt8], outcome: Outcome, random: inout SplitMix64) throws(FuzzViolation) {
        guard outcome.error == nil, outcome.leftover > 0 else { return }
        var decoder = RESPDecoder()
        var buffer = ByteBuffer(bytes: input)
        do {
            while try decoder.decode(buffer: &buffer) != nil {}
        } catch {
            try requireRESP(false, "threw \(error) on bytes that decoded without error", input, outcome)
        }
        let pending = Array(buffer.readableBytesView)
        var prefix = ByteBuffer(bytes: pending.prefix(random.int(in: 0...(pending.count - 1))))
        let readable = prefix.readableBytes
        do {
            let value = try decoder.decode(buffer: &prefix)
            try requireRESP(value == nil && prefix.readableBytes == readable, "a prefix of a partial reply gave \(value!)", input, outcome)
        } catch let violation as FuzzViolation {
            throw violation
        } catch {
            try requireRESP(false, "a prefix of a partial reply threw \(error)", input, outcome)
        }
        // Unrelated bytes after a partial reply: anything but a trap is acceptable.
        var unrelated = ByteBuffer(bytes: input.reversed())
        _ = try? decoder.decode(buffer: &unrelated)
    }
}

// MARK: - Feeding

/// What a decoder made of a byte stream.
struct Outcome: Equatable, CustomStringConvertible {
    var values: [RESPValue] = []
    /// The bytes each value took.
    var consumed: [Int] = []
    var error: RESPError?
    /// Bytes not consumed: after the error, or of a reply still incomplete.
    var leftover = 0

    var description: String {
        "values \(values) (bytes \(consumed)), error \(error.map { "\($0)" } ?? "none"), leftover \(leftover)"
    }
}

/// Bytes put past the writer index by `feed(hiddenTrailer: true)`: CR LFs and a complete reply,
/// which would complete almost any partial token if the decoder read beyond the readable bytes.
private let trailer: [UInt8] = Array("\r\n\r\n:0\r\n\r\n+\r\n\r\n".utf8)

/// Feeds `input` to a copy of `decoder` in pieces ending at `cuts` (sorted), appending each to one
/// cumulation buffer and decoding until nil after each append, as ByteToMessageHandler does; with
/// `compact`, read bytes are discarded between pieces. Checks the decoder's contract on each call.
func feed(
    _ input: [UInt8], cuts: [Int] = [], decoder: RESPDecoder, compact: Bool = false, hiddenTrailer: Bool = false
) throws(FuzzViolation) -> Outcome {
    var decoder = decoder
    var outcome = Outcome()
    var cumulation = ByteBuffer()
    var start = 0
    for cut in cuts + [input.count] where cut >= start {
        cumulation.writeBytes(input[start..<cut])
        start = cut
        if hiddenTrailer {
            let writerIndex = cumulation.writerIndex
            cumulation.writeBytes(trailer)
            cumulation.moveWriterIndex(to: writerIndex)
        }
        while true {
            let readerIndex = cumulation.readerIndex
            let readable = cumulation.readableBytes
            do {
                guard let value = try decoder.decode(buffer: &cumulation) else {
                    try requireRESP(
                        cumulation.readerIndex == readerIndex && cumulation.readableBytes == readable,
                        "nil, yet the reader index moved", input, outcome)
                    break
                }
                let consumed = readable - cumulation.readableBytes
                try requireRESP(
                    consumed > 0 && cumulation.readerIndex == readerIndex + consumed,
                    "\(value) consumed \(consumed) bytes", input, outcome)
                outcome.values.append(value)
                outcome.consumed.append(consumed)
            } catch let violation as FuzzViolation {
                throw violation
            } catch let error as RESPError {
                try requireRESP(cumulation.readerIndex == readerIndex, "\(error), yet the reader index moved", input, outcome)
                try requireRESP(
                    error.offset >= 0 && error.offset < readable,
                    "\(error) is outside the \(readable) bytes present", input, outcome)
                outcome.error = error
                outcome.leftover = cumulation.readableBytes + (input.count - start)
                return outcome
            } catch {
                try requireRESP(false, "threw \(error), which is not a RESPError", input, outcome)
            }
        }
        if compact {
            cumulation.discardReadBytes()
        }
    }
    outcome.leftover = cumulation.readableBytes
    return outcome
}

// MARK: - Helpers

/// Throws, saying what failed and on which input, when `condition` is false.
func requireRESP(
    _ condition: Bool, _ message: @autoclosure () -> String, _ input: [UInt8], _ outcome: Outcome
) throws(FuzzViolation) {
    guard !condition else { return }
    let bytes = input.count <= 512 ? "\(input)" : "(\(input.count) bytes)"
    throw FuzzViolation("RESP invariant violated: \(message())\ninput: \(bytes)\noutcome: \(outcome)")
}

/// Whether `value` keeps within the limits of `decoder`.
func withinLimits(_ value: RESPValue, _ decoder: RESPDecoder, depth: Int = 0) -> Bool {
    switch value {
    case .simpleString(let text), .error(let text): return text.readableBytes <= decoder.maximumLineLength
    case .integer: return true
    case .bulkString(let payload): return (payload?.readableBytes ?? 0) <= decoder.maximumBulkLength
    case .array(let elements):
        guard depth < decoder.maximumDepth else { return false }
        guard let elements else { return true }
        return elements.count <= decoder.maximumArrayLength
            && elements.allSatisfy { withinLimits($0, decoder, depth: depth + 1) }
    }
}

extension RESPDecoderInvariants {
    static func limits(_ decoder: RESPDecoder) -> String {
        "(depth \(decoder.maximumDepth), array \(decoder.maximumArrayLength), bulk \(decoder.maximumBulkLength), "
            + "line \(decoder.maximumLineLength))"
    }
}

extension RESPError.Reason {
    /// Whether this is a limit of the decoder rather than bad syntax.
    var isLimit: Bool {
        switch self {
        case .tooDeep, .bulkTooLong, .arrayTooLong, .lineTooLong: return true
        case .badTypeByte, .badInteger, .badLength, .missingCRLF: return false
        }
    }
}


struct SplitMix64 {
    var state: UInt64

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func int(in range: ClosedRange<Int>) -> Int {
        range.lowerBound + Int(self.next() % UInt64(range.count))
    }
}
