// IngestLineOracle: the FuzzIngestLine check. `IngestLineParser.parse` on any
// bytes, compared with Foundation's `JSONSerialization`, with a second, naive
// UTF-8 check (the standard library's), and with itself on the same bytes at
// other addresses.
//
// Rules, on every input:
//  * the same result from an exactly sized heap copy (AddressSanitizer sees a
//    read past the end) and from a copy at an odd offset followed by bytes that
//    would change the answer if read (`"`, `}`, `\`): no byte outside the line
//    is ever read;
//  * `invalid_utf8` exactly when the standard library finds the bytes invalid;
//  * both parsers agree on whether the line is JSON at all, except for the
//    allowed disagreements below;
//  * when both accept: the reason follows from Foundation's object (a reserved
//    key, a topic or type breaking its rule, no topic), and for an accepted line
//    the topic and type agree, no top-level key is `seq` or `op` once unescaped,
//    the object range is the `{...}` with only whitespace around it, and the
//    event frame the relay builds parses to the same object plus `seq`.
//
// Allowed disagreements (also in Fuzz/README.md), seen with Swift 6.3.1:
//
//   Foundation accepts, relay rejects   | why
//   ------------------------------------+------------------------------------------------
//   a leading BOM (EF BB BF)            | the relay takes UTF-8 only, no BOM: invalid_json
//   a trailing comma (`[1,]`, `{"a":1,}`)| RFC 8259 has none: invalid_json
//   UTF-16/UTF-32 (NULs in the first 4  | Foundation guesses the encoding; the relay reads
//   bytes, or a UTF-16 BOM)             | UTF-8 only: invalid_json or invalid_utf8
//   nesting deeper than 512             | the relay's limit, for subscribers' parsers
//   duplicate `topic` or `type` keys    | the relay rejects them: duplicate_field
//
//   relay accepts, Foundation rejects   | why
//   ------------------------------------+------------------------------------------------
//   a number out of Double's range      | the relay does not parse numbers (`1e999`)
//   (`1e999`)                           |
//   a lone surrogate escape (`\ud800`)  | the relay decodes it to U+FFFD (contract)
//
//   and Foundation drops U+FEFF in strings (raw or `\ufeff`; at their start, after an escape):
//   `"\u{FEFF}topic"` is `topic` to it; such a line is compared again with U+2060 in its place.

import Foundation
import NIOCore
import RelayHub

enum IngestLineOracle {
    static func check(_ input: [UInt8]) throws(FuzzViolation) {
        let result = IngestLineParser.parse(input)
        try checkSameResultElsewhere(input, result)
        try checkUTF8(input, result)
        do {
            try compareWithFoundation(input, result)
        } catch {
            // Foundation drops U+FEFF in strings, at their start or after an escape at least
            // (CFString's BOM handling): the same line with another character there must agree.
            let neutral = replacingBOMsInStrings(input)
            guard neutral != input, (try? compareWithFoundation(neutral, IngestLineParser.parse(neutral))) != nil
            else { throw error }
        }
    }

    static func compareWithFoundation(_ input: [UInt8], _ result: Result<IngestLine, IngestLineError>)
        throws(FuzzViolation)
    {
        let foundation = foundationObject(input)
        switch (isJSON(result), foundation) {
        case (false, nil):
            return
        case (true, nil):
            try require(
                relayOnlyReason(input) != nil,
                "relay takes \(describe(input)) for JSON (\(result)), Foundation rejects it; no allowed reason")
        case (false, .some):
            try require(
                foundationOnlyReason(input) != nil,
                "relay rejects \(describe(input)) (\(result)), Foundation accepts it; no allowed reason")
        case (true, .some(let object)):
            try checkAgainstFoundation(input, result, object)
        }
    }

    /// Whether the relay found the line to be JSON (the reasons after `invalid_json` in precedence).
    static func isJSON(_ result: Result<IngestLine, IngestLineError>) -> Bool {
        switch result {
        case .success: return true
        case .failure(.invalidJSON), .failure(.invalidUTF8): return false
        case .failure: return true
        }
    }

    static func foundationObject(_ bytes: [UInt8]) -> Any? {
        try? JSONSerialization.jsonObject(with: Data(bytes), options: [.fragmentsAllowed])
    }

    // MARK: The parser against itself

    private static let trailer: [UInt8] = Array("\"}]\\\"\u{0}\n".utf8)

    static func checkSameResultElsewhere(_ input: [UInt8], _ result: Result<IngestLine, IngestLineError>)
        throws(FuzzViolation)
    {
        let exact = UnsafeMutableRawBufferPointer.allocate(byteCount: max(input.count, 1), alignment: 1)
        defer { exact.deallocate() }
        input.withUnsafeBytes { exact.copyMemory(from: $0) }
        let fromExact = IngestLineParser.parse(UnsafeRawBufferPointer(rebasing: exact[0..<input.count]))
        try require(fromExact == result, "\(describe(input)): \(result), but \(fromExact) from an exact copy")

        let offset = 1 + Int(fnv1a(input) % 7)
        let padded = [UInt8](repeating: UInt8(ascii: "{"), count: offset) + input + trailer
        let fromPadded = padded.withUnsafeBytes { raw in
            IngestLineParser.parse(UnsafeRawBufferPointer(rebasing: raw[offset..<(offset + input.count)]))
        }
        try require(fromPadded == result, "\(describe(input)): \(result), but \(fromPadded) at offset \(offset)")
    }

    static func checkUTF8(_ input: [UInt8], _ result: Result<IngestLine, IngestLineError>) throws(FuzzViolation) {
        let valid = String(validating: input, as: UTF8.self) != nil
        try require(
            valid == (result != .failure(.invalidUTF8)),
            "\(describe(input)): \(result), yet the standard library finds the UTF-8 \(valid ? "valid" : "invalid")")
    }

    // MARK: Both take it for JSON

    static func checkAgainstFoundation(_ input: [UInt8], _ result: Result<IngestLine, IngestLineError>, _ object: Any)
        throws(FuzzViolation)
    {
        let said = "\(describe(input)): relay \(result), Foundation \(object)"
        guard let fields = object as? [String: Any] else {
            try require(result == .failure(.notObject), "\(said): not an object")
            return
        }
        try require(result != .failure(.notObject), "\(said): an object")
        let reserved = fields["seq"] != nil || fields["op"] != nil
        if result == .failure(.reservedField) {
            try require(reserved, "\(said): no seq or op")
            return
        }
        try require(!reserved, "\(said): has seq or op")
        // Foundation keeps one of duplicate keys: nothing to compare with for duplicate_field.
        if result == .failure(.duplicateField) { return }

        let topic = fields["topic"]
        let type = fields["type"]
        let topicValid = topic.map { ($0 as? String).map(isValidTopic) ?? false }
        let typeValid = type.map { ($0 as? String).map { $0.utf8.count <= 64 } ?? false }
        switch result {
        case .failure(.invalidTopic):
            try require(topicValid == false, "\(said): topic is valid or absent")
        case .failure(.invalidType):
            try require(topicValid != false && typeValid == false, "\(said): topic invalid or type valid or absent")
        case .failure(.missingTopic):
            try require(topic == nil && typeValid != false, "\(said): has a topic, or an invalid type")
        case .success(let line):
            try require(topicValid == true && typeValid != false, "\(said): topic or type invalid")
            try require(line.topic == topic as? String, "\(said): topic \(line.topic.debugDescription)")
            try require(line.type == type as? String, "\(said): type \(String(describing: line.type))")
            try checkFrame(input, line, fields, said: said)
        case .failure(let error):
            try require(false, "\(said): unexpected \(error)")
        }
    }

    /// The object range, and the frame built from it: `{"seq":N,` + the object after its `{`.
    static func checkFrame(_ input: [UInt8], _ line: IngestLine, _ fields: [String: Any], said: String)
        throws(FuzzViolation)
    {
        let range = line.objectStart..<line.objectEnd
        try require(
            range.count >= 2 && range.upperBound <= input.count && input[range.lowerBound] == UInt8(ascii: "{")
                && input[range.upperBound - 1] == UInt8(ascii: "}"),
            "\(said): object range \(range)")
        try require(
            (input[..<range.lowerBound] + input[range.upperBound...]).allSatisfy { [0x20, 0x09, 0x0A, 0x0D].contains($0) },
            "\(said): more than whitespace around the object range \(range)")

        // Below 2^53, so that Foundation's number is exact whatever type it picks.
        let seq = fnv1a(input) % (1 << 53)
        let frame = input[range].withUnsafeBytes { object in
            WebSocketText.eventFrame(seq: seq, object: object, allocator: ByteBufferAllocator())
        }
        try require(frame.getInteger(at: frame.readerIndex, as: UInt8.self) == 0x81, "\(said): frame is not FIN + text")
        let payload = Array(WebSocketText.payload(of: frame).readableBytesView)
        guard let published = foundationObject(payload) as? [String: Any] else {
            throw FuzzViolation("\(said): the frame's payload \(describe(payload)) is no JSON object to Foundation")
        }
        var expected = fields
        expected["seq"] = NSNumber(value: seq)
        try require(
            jsonEqual(published, expected),
            "\(said): the frame's payload parses to \(published), not the object plus seq \(seq)")
        // And the relay would refuse the frame as an ingest line: it carries `seq`.
        let again = IngestLineParser.parse(payload)
        try require(again == .failure(.reservedField), "\(said): the frame as an ingest line gives \(again)")
    }

    /// The topic rule, written again from the contract: 1...256 bytes of `A-Z a-z 0-9 _ - . : / @ =`.
    static func isValidTopic(_ topic: String) -> Bool {
        let allowed = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.:/@=".utf8)
        return (1...256).contains(topic.utf8.count) && topic.utf8.allSatisfy(allowed.contains)
    }

    // MARK: Allowed disagreements

    /// Why Foundation may reject a line the relay takes for JSON, or nil.
    static func relayOnlyReason(_ input: [UInt8]) -> String? {
        guard foundationObject(input) == nil else { return nil }
        let numbers = replacingNumbers(input)
        if numbers != input, foundationObject(numbers) != nil { return "a number out of Double's range" }
        let surrogates = replacingLoneSurrogates(input)
        if surrogates != input, foundationObject(surrogates) != nil { return "a lone surrogate escape" }
        let both = replacingLoneSurrogates(numbers)
        if both != input, foundationObject(both) != nil { return "numbers and lone surrogates" }
        return nil
    }

    /// Why Foundation may accept a line the relay rejects, or nil.
    static func foundationOnlyReason(_ input: [UInt8]) -> String? {
        if maximumDepth(input) > 512 { return "nesting deeper than 512" }
        if input.prefix(4).contains(0) || input.starts(with: [0xFE, 0xFF]) || input.starts(with: [0xFF, 0xFE]) {
            return "UTF-16 or UTF-32 to Foundation"
        }
        var rest = input
        var reasons: [String] = []
        if rest.starts(with: [0xEF, 0xBB, 0xBF]) {
            rest.removeFirst(3)
            reasons.append("a leading BOM")
        }
        let withoutCommas = removingTrailingCommas(rest)
        if withoutCommas != rest {
            rest = withoutCommas
            reasons.append("a trailing comma")
        }
        guard !reasons.isEmpty else { return nil }
        let relay = IngestLineParser.parse(rest)
        return isJSON(relay) || foundationOnlyReason(rest) != nil ? reasons.joined(separator: ", ") : nil
    }

    /// Deepest nesting of `[` and `{` outside strings.
    static func maximumDepth(_ input: [UInt8]) -> Int {
        var depth = 0
        var deepest = 0
        forEachByteOutsideStrings(input) { _, byte in
            if byte == UInt8(ascii: "[") || byte == UInt8(ascii: "{") {
                depth += 1
                deepest = max(deepest, depth)
            } else if byte == UInt8(ascii: "]") || byte == UInt8(ascii: "}") {
                depth -= 1
            }
        }
        return deepest
    }

    /// Each number outside strings replaced by `0`.
    static func replacingNumbers(_ input: [UInt8]) -> [UInt8] {
        let numberBytes = Set("+-.0123456789eE".utf8)
        let firstBytes = Set("-0123456789".utf8)
        var output: [UInt8] = []
        var inNumber = false
        var outside = Set<Int>()
        forEachByteOutsideStrings(input) { index, _ in outside.insert(index) }
        for (index, byte) in input.enumerated() {
            if outside.contains(index), inNumber ? numberBytes.contains(byte) : firstBytes.contains(byte) {
                if !inNumber { output.append(UInt8(ascii: "0")) }
                inNumber = true
            } else {
                inNumber = false
                output.append(byte)
            }
        }
        return output
    }

    /// Each `\uD800`...`\uDFFF` escape that is not half of a pair replaced by `\uFFFD` (same length).
    static func replacingLoneSurrogates(_ input: [UInt8]) -> [UInt8] {
        var output = input
        var escapes: [(index: Int, value: UInt32)] = []
        var index = 0
        var inString = false
        while index < input.count {
            let byte = input[index]
            if !inString {
                inString = byte == UInt8(ascii: "\"")
            } else if byte == UInt8(ascii: "\"") {
                inString = false
            } else if byte == UInt8(ascii: "\\"), index + 1 < input.count {
                if input[index + 1] == UInt8(ascii: "u"), index + 6 <= input.count,
                    let value = UInt32(String(decoding: input[(index + 2)..<(index + 6)], as: UTF8.self), radix: 16)
                {
                    escapes.append((index, value))
                    index += 6
                    continue
                }
                index += 2
                continue
            }
            index += 1
        }
        var k = 0
        while k < escapes.count {
            let (at, value) = escapes[k]
            if (0xD800...0xDBFF).contains(value), k + 1 < escapes.count, escapes[k + 1].index == at + 6,
                (0xDC00...0xDFFF).contains(escapes[k + 1].value)
            {
                k += 2
                continue
            }
            if (0xD800...0xDFFF).contains(value) {
                output.replaceSubrange((at + 2)..<(at + 6), with: Array("FFFD".utf8))
            }
            k += 1
        }
        return output
    }

    /// U+FEFF in strings, raw or escaped, replaced by U+2060 (same length).
    static func replacingBOMsInStrings(_ input: [UInt8]) -> [UInt8] {
        var output = input
        var index = 0
        var inString = false
        while index < input.count {
            let byte = input[index]
            if !inString {
                inString = byte == UInt8(ascii: "\"")
            } else if byte == UInt8(ascii: "\"") {
                inString = false
            } else if input[index...].starts(with: [0xEF, 0xBB, 0xBF]) {
                output.replaceSubrange(index..<(index + 3), with: [0xE2, 0x81, 0xA0])
                index += 3
                continue
            } else if byte == UInt8(ascii: "\\"), index + 1 < input.count {
                if input[index + 1] == UInt8(ascii: "u"), index + 6 <= input.count,
                    String(decoding: input[(index + 2)..<(index + 6)], as: UTF8.self).lowercased() == "feff"
                {
                    output.replaceSubrange((index + 2)..<(index + 6), with: Array("2060".utf8))
                }
                index += 2
                continue
            }
            index += 1
        }
        return output
    }

    /// Commas outside strings followed (after whitespace) by `]` or `}` removed.
    static func removingTrailingCommas(_ input: [UInt8]) -> [UInt8] {
        var commas = Set<Int>()
        var lastComma: Int?
        forEachByteOutsideStrings(input) { index, byte in
            switch byte {
            case UInt8(ascii: ","): lastComma = index
            case 0x20, 0x09, 0x0A, 0x0D: break
            case UInt8(ascii: "]"), UInt8(ascii: "}"):
                if let comma = lastComma { commas.insert(comma) }
                lastComma = nil
            default: lastComma = nil
            }
        }
        return input.enumerated().filter { !commas.contains($0.offset) }.map(\.element)
    }

    /// Calls `body` with each byte outside string literals (quotes included), naively: enough to
    /// classify a disagreement, not to judge JSON.
    static func forEachByteOutsideStrings(_ input: [UInt8], _ body: (Int, UInt8) -> Void) {
        var inString = false
        var escaped = false
        for (index, byte) in input.enumerated() {
            if inString {
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                    body(index, byte)
                }
            } else {
                if byte == UInt8(ascii: "\"") { inString = true }
                body(index, byte)
            }
        }
    }
}

/// Whether two values from `JSONSerialization` are the same JSON value.
func jsonEqual(_ a: Any, _ b: Any) -> Bool {
    switch (a, b) {
    case (let x as [String: Any], let y as [String: Any]):
        return x.count == y.count && x.allSatisfy { key, value in y[key].map { jsonEqual(value, $0) } ?? false }
    case (let x as [Any], let y as [Any]):
        return x.count == y.count && zip(x, y).allSatisfy(jsonEqual)
    case (let x as String, let y as String):
        return x.utf8.elementsEqual(y.utf8)
    case (is NSNull, is NSNull):
        return true
    case (let x as NSNumber, let y as NSNumber):
        return x == y
    default:
        return false
    }
}

/// FNV-1a: what the oracles derive from an input (a seq, an offset) comes from its bytes.
func fnv1a(_ bytes: [UInt8]) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in bytes {
        hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3
    }
    return hash
}
