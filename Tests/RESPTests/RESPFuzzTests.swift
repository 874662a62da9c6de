// Seeded random tests of RESPDecoder: random well-formed replies decode to what
// was encoded however they are split, and 100,000 random and mutated inputs
// never crash the decoder, give the same outcome whole as in pieces, and
// never yield a value beyond the decoder's limits.

import NIOCore
import Testing

@testable import RESP

/// Bytes that steer mutations towards the parser's decisions.
private let interestingBytes: [UInt8] = Array("\r\n+-:$*0129".utf8) + [0, 0x7F, 0xFF]
private let interestingNumbers: [[UInt8]] = [
    "-1", "-2", "0", "00", "1", "3", "19", "65537", "1048577", "67108865", "9223372036854775807",
    "9223372036854775808", "-9223372036854775808", "99999999999999999999",
].map { Array($0.utf8) }

private func randomBytes(_ count: Int, using random: inout SplitMix64) -> [UInt8] {
    (0..<count).map { _ in
        Bool.random(using: &random)
            ? interestingBytes.randomElement(using: &random)! : UInt8.random(in: 0...255, using: &random)
    }
}

/// A random value at most `depth` arrays deep.
private func randomValue(depth: Int, using random: inout SplitMix64) -> RESPValue {
    let line = { (random: inout SplitMix64) -> ByteBuffer in
        // Simple strings and errors cannot hold CR or LF.
        ByteBuffer(bytes: randomBytes(Int.random(in: 0...12, using: &random), using: &random).filter { $0 != 13 && $0 != 10 })
    }
    switch Int.random(in: 0..<(depth > 0 ? 9 : 7), using: &random) {
    case 0: return .simpleString(line(&random))
    case 1: return .error(line(&random))
    case 2: return .integer(Int64.random(in: .min ... .max, using: &random))
    case 3: return .integer(Int64.random(in: -1000...1000, using: &random))
    case 4: return .bulkString(ByteBuffer(bytes: randomBytes(Int.random(in: 0...40, using: &random), using: &random)))
    case 5: return .bulkString(nil)
    case 6: return .array(Bool.random(using: &random) ? nil : [])
    default:
        return .array(
            (0..<Int.random(in: 1...5, using: &random)).map { _ in randomValue(depth: depth - 1, using: &random) })
    }
}

private func mutate(_ input: [UInt8], using random: inout SplitMix64) -> [UInt8] {
    var bytes = input
    for _ in 0..<Int.random(in: 1...3, using: &random) {
        let position = Int.random(in: 0...bytes.count, using: &random)
        switch Int.random(in: 0..<7, using: &random) {
        case 0 where position < bytes.count:
            bytes[position] = UInt8.random(in: 0...255, using: &random)
        case 1 where position < bytes.count:
            bytes[position] = interestingBytes.randomElement(using: &random)!
        case 2:
            bytes.insert(interestingBytes.randomElement(using: &random)!, at: position)
        case 3 where position < bytes.count:
            bytes.remove(at: position)
        case 4:
            bytes.removeLast(bytes.count - position)  // truncate
        case 5:
            bytes.insert(contentsOf: interestingNumbers.randomElement(using: &random)!, at: position)
        default:
            let end = Int.random(in: position...min(bytes.count, position + 16), using: &random)
            bytes.insert(contentsOf: bytes[position..<end], at: Int.random(in: 0...bytes.count, using: &random))
        }
    }
    return bytes
}

/// Whether `value` keeps within the decoder's limits.
private func withinLimits(_ value: RESPValue, _ decoder: RESPDecoder, depth: Int = 0) -> Bool {
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

private func randomCuts(_ count: Int, using random: inout SplitMix64) -> [Int] {
    (0..<Int.random(in: 1...4, using: &random)).map { _ in Int.random(in: 0...count, using: &random) }.sorted()
}

@Suite("RESPDecoder, random input")
struct RESPFuzzTests {
    @Test func randomRepliesDecodeToWhatWasEncodedHoweverSplit() {
        var random = SplitMix64(state: 0x5245_5350)
        var failures = 0
        for iteration in 0..<5_000 {
            let values = (0..<Int.random(in: 1...4, using: &random)).map { _ in randomValue(depth: 4, using: &random) }
            let input = values.flatMap(encoded)
            let expected = Outcome(values: values)
            let outcomes = [
                feed(input), feed(input, cuts: randomCuts(input.count, using: &random), compact: Bool.random(using: &random)),
            ]
            for outcome in outcomes where outcome != expected {
                failures += 1
                if failures <= 5 { Issue.record("iteration \(iteration): input \(input), got \(outcome), expected \(expected)") }
            }
            if iteration % 50 == 0, feedByteByByte(input) != expected {
                failures += 1
                if failures <= 5 { Issue.record("iteration \(iteration) byte by byte: input \(input)") }
            }
        }
        #expect(failures == 0)
    }

    @Test func mutatedInputNeverCrashesAndGivesTheSameOutcomeInPieces() {
        var random = SplitMix64(state: 13)
        let decoders = [
            RESPDecoder(),
            RESPDecoder(maximumDepth: 3, maximumArrayLength: 4, maximumBulkLength: 16, maximumLineLength: 8),
        ]
        var failures = 0
        var errors: [String: Int] = [:]
        var valuesDecoded = 0
        for iteration in 0..<100_000 {
            let decoder = decoders[iteration % 2]
            let values = (0..<Int.random(in: 1...3, using: &random)).map { _ in randomValue(depth: 5, using: &random) }
            let input: [UInt8]
            switch iteration % 10 {
            case 0: input = randomBytes(Int.random(in: 0...64, using: &random), using: &random)  // noise
            default: input = mutate(values.flatMap(encoded), using: &random)
            }

            let whole = feed(input, decoder: decoder)
            let pieces = feed(input, cuts: randomCuts(input.count, using: &random), decoder: decoder, compact: Bool.random(using: &random))
            var problems: [String] = []
            if pieces != whole { problems.append("in pieces: \(pieces)") }
            if iteration % 100 == 0 {
                let single = feedByteByByte(input, decoder: decoder)
                if single != whole { problems.append("byte by byte: \(single)") }
            }
            if whole.contractViolations > 0 { problems.append("contract violated") }
            if !whole.values.allSatisfy({ withinLimits($0, decoder) }) { problems.append("a value beyond the limits") }
            if !problems.isEmpty {
                failures += 1
                if failures <= 5 {
                    Issue.record("iteration \(iteration): input \(input); whole: \(whole); \(problems.joined(separator: "; "))")
                }
            }
            valuesDecoded += whole.values.count
            if let error = whole.error { errors["\(error.reason)".prefix { $0 != "(" }.description, default: 0] += 1 }
        }
        #expect(failures == 0)
        // The mutations reach every kind of error and still let many values through.
        #expect(Set(errors.keys) == ["badTypeByte", "badInteger", "badLength", "missingCRLF", "tooDeep", "bulkTooLong", "arrayTooLong", "lineTooLong"], "\(errors)")
        #expect(valuesDecoded > 50_000)
    }

    @Test func deepNestingIsRefusedWithoutRecursion() {
        // A million nested arrays: refused at the 33rd, in one piece and in many.
        let input = Array(repeating: bytes("*1\r\n"), count: 1_000_000).joined()
        let expected = Outcome(error: RESPError(.tooDeep(limit: 32), offset: 128), leftover: 4_000_000)
        #expect(feed(Array(input)) == expected)
        #expect(feed(Array(input), cuts: [1, 2, 3, 129, 130, 1000]) == expected)
    }

    @Test func roomIsReservedOnlyForElementsThatCanBePresent() throws {
        // The rule the build pass uses: at most one element per 3 bytes present.
        #expect(RESPDecoder.elementsToReserve(declared: 1 << 20, bytesPresent: 10) == 3)
        #expect(RESPDecoder.elementsToReserve(declared: 2, bytesPresent: 1000) == 2)
        #expect(RESPDecoder.elementsToReserve(declared: .max, bytesPresent: 0) == 0)

        // 32 nested arrays each declaring the maximum of elements, and nothing more: the decoder
        // waits (it would need 2^640 elements to finish), call after call, fresh or not.
        let input = Array(repeating: bytes("*1048576\r\n"), count: 32).joined()
        var decoder = RESPDecoder()
        var buffer = ByteBuffer(bytes: Array(input))
        for _ in 0..<1000 {
            #expect(try decoder.decode(buffer: &buffer) == nil)
        }
        var fresh = RESPDecoder()
        for _ in 0..<1000 {
            #expect(try fresh.decode(buffer: &buffer) == nil)
            fresh = RESPDecoder()
        }
        #expect(buffer.readerIndex == 0)
    }
}
