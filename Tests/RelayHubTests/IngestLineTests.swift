import Testing

@testable import RelayHub

private func parse(_ line: String) -> Result<IngestLine, IngestLineError> {
    IngestLineParser.parse(Array(line.utf8))
}

private func error(_ result: Result<IngestLine, IngestLineError>) -> IngestLineError? {
    if case .failure(let error) = result { return error }
    return nil
}

private func success(_ result: Result<IngestLine, IngestLineError>) -> IngestLine? {
    if case .success(let line) = result { return line }
    return nil
}

/// `prefix` + raw bytes + `suffix`, for lines that must contain exact (possibly invalid) bytes.
private func bytes(_ prefix: String, _ middle: [UInt8], _ suffix: String = "") -> [UInt8] {
    Array(prefix.utf8) + middle + Array(suffix.utf8)
}

/// Deterministic generator so the mutation test is reproducible.
private struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite("IngestLineParser")
struct IngestLineTests {

    // MARK: Valid lines

    static let validLines: [(String, String, String?)] = [
        (#"{"topic":"a"}"#, "a", nil),
        (#"{"topic":"build/42","type":"progress"}"#, "build/42", "progress"),
        (" \t\r\n{\"topic\":\"a\"} \t\r\n", "a", nil),
        (#"{ "topic" : "a" , "type" : "t" }"#, "a", "t"),
        (#"{"type":"t","topic":"a"}"#, "a", "t"),
        (#"{"topic":"AZaz09_-.:/@="}"#, "AZaz09_-.:/@=", nil),
        (#"{"topic":"a","data":{"seq":1,"op":"x","topic":5,"type":null,"topic":6},"list":[{"seq":2},{"op":[]}]}"#, "a", nil),
        (#"{"topic":"a","msg":"héllo wörld — 日本語 🎉 \u00e9"}"#, "a", nil),
        (#"{"topic":"a","msg":"\"\\\/\b\f\n\r\t\u00e9\uD83D\uDE00\u0000\uFFFF"}"#, "a", nil),
        (#"{"topic":"a","n":[0,-0,1,-1,123,1.5,-0.0,1e10,1E+10,1e-10,0.1e1,12345678901234567890123,-1.25E-300,0e0,0E-0,9.99]}"#, "a", nil),
        (#"{"topic":"a","v":[true,false,null],"t":true,"f":false,"z":null}"#, "a", nil),
        (#"{"topic":"a","o":{},"a":[],"s":"","ao":[{}],"oa":{"x":[]},"ws":[ ],"wo":{ },"aa":[[],[[]]]}"#, "a", nil),
        (#"{"topic":"a\/b\u0041\u002d"}"#, "a/bA-", nil),
        (#"{"\u0074opic":"a"}"#, "a", nil),
        (#"{"topic":"a","type":"é"}"#, "a", "é"),
        (#"{"topic":"a","type":""}"#, "a", ""),
        (#"{"topic":"a","type":"\uD83D\uDE00"}"#, "a", "😀"),
        (#"{"topic":"a","type":"\ud800"}"#, "a", "\u{FFFD}"),
        (#"{"topic":"a","type":"\udc00x\ud800\u0041"}"#, "a", "\u{FFFD}x\u{FFFD}A"),
        (#"{"topic":"a","type":"\u0000"}"#, "a", "\u{0}"),
        (#"{"topic":"a","x":1,"x":2,"x":{"x":3}}"#, "a", nil),
        (#"{"topic":"a","topics":1,"Type":2,"se":3,"opx":4,"SEQ":5,"o":6,"Op":7,"seqq":8,"":9}"#, "a", nil),
        (#"{"topic":"a","op\u0000":1,"\u0000op":2,"se\u0071\u0000":3}"#, "a", nil),
        (#"{"topic":"a","k":"\ud800","l":"\udfff\udbff"}"#, "a", nil),
        (#"{"topic":"a","ty\/pe":"x","type":"y"}"#, "a", "y"),
        (#"{"topic":"a","type\u0000":1,"typ\u0065\u0000":2,"\u0000type":3,"type":"x"}"#, "a", "x"),
        (#"{"topic":"a","topic\u0000":1,"\u0000topic":2,"top":3}"#, "a", nil),
        (#"{"topic":"task:0123456789abcdef","msg":"a fairly long ASCII message that spans several machine words","pct":12.5}"#,
         "task:0123456789abcdef", nil),
        (#"{"topic":"a","nested":[[[[{"a":[{"b":{"c":[1,{"d":"e"}]}}]}]]]]}"#, "a", nil),
        ("{\"topic\":\"a\",\"msg\":\"\u{7F}\u{80}\u{7FF}\u{800}\u{D7FF}\u{E000}\u{FFFF}\u{10000}\u{10FFFF}\"}", "a", nil),
    ]

    @Test("valid lines are accepted with their routing fields", arguments: validLines)
    func validLine(line: String, topic: String, type: String?) throws {
        let parsed = try #require(success(parse(line)))
        #expect(parsed.topic == topic)
        #expect(parsed.type == type)
    }

    @Test("objectStart/objectEnd delimit exactly the object", arguments: validLines.map(\.0))
    func offsetsDelimitTheObject(line: String) throws {
        let utf8 = Array(line.utf8)
        let parsed = try #require(success(IngestLineParser.parse(utf8)))
        #expect(utf8[parsed.objectStart] == UInt8(ascii: "{"))
        #expect(utf8[parsed.objectEnd - 1] == UInt8(ascii: "}"))
        let whitespace: Set<UInt8> = [0x20, 0x09, 0x0A, 0x0D]
        #expect(utf8[..<parsed.objectStart].allSatisfy(whitespace.contains))
        #expect(utf8[parsed.objectEnd...].allSatisfy(whitespace.contains))
        // The object alone, with no surrounding whitespace, must parse identically.
        let inner = try #require(success(IngestLineParser.parse(Array(utf8[parsed.objectStart..<parsed.objectEnd]))))
        #expect(inner.topic == parsed.topic && inner.type == parsed.type)
        #expect(inner.objectStart == 0 && inner.objectEnd == parsed.objectEnd - parsed.objectStart)
    }

    @Test func exactOffsets() throws {
        let parsed = try #require(success(parse("  {\"topic\":\"a\"} \t")))
        #expect(parsed == IngestLine(topic: "a", type: nil, objectStart: 2, objectEnd: 15))
        let bare = try #require(success(parse(#"{"topic":"a","type":"b"}"#)))
        #expect(bare == IngestLine(topic: "a", type: "b", objectStart: 0, objectEnd: 24))
    }

    @Test func offsetsAreRelativeToTheGivenBuffer() throws {
        let buffer = Array("XX\t{\"topic\":\"a\"}YY".utf8)
        let result = buffer.withUnsafeBytes { raw in
            IngestLineParser.parse(UnsafeRawBufferPointer(rebasing: raw[2..<(raw.count - 2)]))
        }
        let parsed = try #require(success(result))
        #expect(parsed.objectStart == 1)
        #expect(parsed.objectEnd == 14)
    }

    @Test func emptyBufferIsInvalidJSON() {
        let result = IngestLineParser.parse(UnsafeRawBufferPointer(start: nil, count: 0))
        #expect(error(result) == .invalidJSON)
        #expect(error(IngestLineParser.parse([UInt8]())) == .invalidJSON)
    }

    @Test func errorRawValuesMatchTheContract() {
        #expect(IngestLineError.invalidUTF8.rawValue == "invalid_utf8")
        #expect(IngestLineError.invalidJSON.rawValue == "invalid_json")
        #expect(IngestLineError.notObject.rawValue == "not_object")
        #expect(IngestLineError.missingTopic.rawValue == "missing_topic")
        #expect(IngestLineError.invalidTopic.rawValue == "invalid_topic")
        #expect(IngestLineError.invalidType.rawValue == "invalid_type")
        #expect(IngestLineError.duplicateField.rawValue == "duplicate_field")
        #expect(IngestLineError.reservedField.rawValue == "reserved_field")
        #expect(IngestLineError.tooLong.rawValue == "line_too_long")
    }

    // MARK: Rejected lines

    static let invalidJSONLines: [String] = [
        // structure
        "", "   ", "\t\r\n",
        "{", "}", "{}}", #"{"topic":"a""#, #"{"topic":"a",}"#, #"{"topic":"a","x":[1,2,]}"#,
        #"{,"topic":"a"}"#, #"{"topic" "a"}"#, #"{"topic":"a" "x":1}"#, #"{"topic":"a"}}"#,
        #"{"topic":"a"}]"#, #"{"topic":"a"]"#, #"{"topic":"a","x":[}"#, #"{"topic":"a","x":{]}"#,
        #"{"topic":"a","x":[1 2]}"#, #"{"topic":"a","x":[,1]}"#, #"{"topic":"a","x":{"k"}}"#,
        #"{"topic":"a","x":{"k":}}"#, #"{"topic":"a","x":{1:2}}"#,
        #"{topic:"a"}"#, #"{'topic':'a'}"#, #"{"topic":'a'}"#, #"{"topic":"a"} x"#, #"{"topic":"a"}{}"#,
        #"{"topic":"a"},"#, #",{"topic":"a"}"#, #"{"topic":}"#, #"{"topic":"a","x":}"#, #"{"topic"}"#,
        #"{"topic":"a"} // c"#, #"/*c*/{"topic":"a"}"#, #"{"topic":"a",/*c*/"x":1}"#, "{\"topic\":\"a\"}\u{0}",
        "\u{0C}{\"topic\":\"a\"}", "\u{0B}{\"topic\":\"a\"}",
        // numbers
        #"{"topic":"a","n":01}"#, #"{"topic":"a","n":-01}"#, #"{"topic":"a","n":00}"#,
        #"{"topic":"a","n":1.}"#, #"{"topic":"a","n":.5}"#, #"{"topic":"a","n":+1}"#,
        #"{"topic":"a","n":-}"#, #"{"topic":"a","n":1e}"#, #"{"topic":"a","n":1e+}"#,
        #"{"topic":"a","n":0x10}"#, #"{"topic":"a","n":NaN}"#, #"{"topic":"a","n":Infinity}"#,
        #"{"topic":"a","n":-Infinity}"#, #"{"topic":"a","n":1.e5}"#, #"{"topic":"a","n":--1}"#,
        #"{"topic":"a","n":1.5.2}"#, #"{"topic":"a","n":1e5e5}"#, #"{"topic":"a","n":- 1}"#, "-",
        // literals
        #"{"topic":"a","v":tru}"#, #"{"topic":"a","v":nul}"#, #"{"topic":"a","v":True}"#,
        #"{"topic":"a","v":nulll}"#, #"{"topic":"a","v":falsy}"#, #"{"topic":"a","v":undefined}"#,
        #"{"topic":"a","v":tr"#, "nul",
        // strings
        #"{"topic":"a"#, "{\"topic\":\"a\tb\"}", "{\"topic\":\"a\",\"m\":\"a\u{1}b\"}", "{\"topic\":\"a\",\"m\":\"\r\"}",
        "{\"topic\":\"a\",\"m\":\"\u{0}\"}", "{\"topic\":\"a\",\"m\":\"\u{1F}\"}",
        #"{"topic":"a","m":"\x"}"#, #"{"topic":"a","m":"\U0041"}"#, #"{"topic":"a","m":"\u12"}"#,
        #"{"topic":"a","m":"\u12G4"}"#, #"{"topic":"a","m":"\'"}"#, #"{"topic":"a","m":"\"#, #"{"topic":"a","m":"\u"#,
        #"{"topic":"a","m":"\u004"#, #"{"to\pic":"a"}"#,
        // well-formed UTF-8 outside strings is still not JSON
        "\u{A0}{\"topic\":\"a\"}", "\u{FEFF}{\"topic\":\"a\"}", "{\"topic\":\"a\"}\u{2028}", "{\"topic\":\u{A0}\"a\"}",
        // an invalid non-object is invalid_json, not not_object
        "[1,", "[1,]", #""abc"#, "[}", "1 2", "[] []",
    ]

    @Test("syntax errors are invalid_json", arguments: invalidJSONLines)
    func invalidJSON(line: String) {
        #expect(error(parse(line)) == .invalidJSON)
    }

    static let notObjectLines: [String] = [
        "[]", "[1,2]", #""topic""#, "42", "-0.5e3", "true", "false", "null", #" [{"topic":"a"}] "#,
        #"[{"seq":1,"topic":"a","topic":"b"}]"#, "\"\\u00e9\"",
    ]

    @Test("valid JSON that is not an object is not_object", arguments: notObjectLines)
    func notObject(line: String) {
        #expect(error(parse(line)) == .notObject)
    }

    static let fieldErrorLines: [(String, IngestLineError)] = [
        // reserved
        (#"{"topic":"a","seq":1}"#, .reservedField),
        (#"{"op":"x","topic":"a"}"#, .reservedField),
        (#"{"topic":"a","seq":null}"#, .reservedField),
        (#"{"topic":"a","s\u0065q":1}"#, .reservedField),
        (#"{"\u006fp":null,"topic":"a"}"#, .reservedField),
        (#"{"\u006F\u0070":{}}"#, .reservedField),
        (#"{"seq":1}"#, .reservedField),
        // duplicate
        (#"{"topic":"a","topic":"b"}"#, .duplicateField),
        (#"{"topic":"a","topic":"a"}"#, .duplicateField),
        (#"{"topic":"a","to\u0070ic":"b"}"#, .duplicateField),
        (#"{"\u0074\u006f\u0070\u0069\u0063":"a","topic":"b"}"#, .duplicateField),
        (#"{"topic":"a","type":"x","type":"y"}"#, .duplicateField),
        (#"{"topic":"a","\u0074\u0079\u0070\u0065":"x","type":"y"}"#, .duplicateField),
        (#"{"topic":"a","type":"x","t\u0079pe":null}"#, .duplicateField),
        (#"{"topic":"a","topic":5}"#, .duplicateField),
        (#"{"type":1,"type":2}"#, .duplicateField),
        // invalid topic
        (#"{"topic":""}"#, .invalidTopic),
        (#"{"topic":5}"#, .invalidTopic),
        (#"{"topic":null}"#, .invalidTopic),
        (#"{"topic":true}"#, .invalidTopic),
        (#"{"topic":["a"]}"#, .invalidTopic),
        (#"{"topic":{}}"#, .invalidTopic),
        (#"{"topic":{"topic":"a"}}"#, .invalidTopic),
        (#"{"topic":"a b"}"#, .invalidTopic),
        (#"{"topic":"a*"}"#, .invalidTopic),
        (#"{"topic":"é"}"#, .invalidTopic),
        (#"{"topic":"\u00e9"}"#, .invalidTopic),
        (#"{"topic":"a\n"}"#, .invalidTopic),
        (#"{"topic":"\u0000"}"#, .invalidTopic),
        (#"{"topic":"\ud800"}"#, .invalidTopic),
        // invalid type
        (#"{"topic":"a","type":null}"#, .invalidType),
        (#"{"topic":"a","type":1}"#, .invalidType),
        (#"{"topic":"a","type":{}}"#, .invalidType),
        (#"{"topic":"a","type":[]}"#, .invalidType),
        (#"{"topic":"a","type":["x"]}"#, .invalidType),
        (#"{"topic":"a","type":false}"#, .invalidType),
        // missing topic
        ("{}", .missingTopic),
        (" { } ", .missingTopic),
        (#"{"type":"x"}"#, .missingTopic),
        (#"{"Topic":"a"}"#, .missingTopic),
        (#"{"topic ":"a"}"#, .missingTopic),
        (#"{"topi":"a"}"#, .missingTopic),
        (#"{"data":{"topic":"a"}}"#, .missingTopic),
        (#"{"list":[{"topic":"a"}]}"#, .missingTopic),
    ]

    @Test("field rules", arguments: fieldErrorLines)
    func fieldErrors(line: String, expected: IngestLineError) {
        #expect(error(parse(line)) == expected)
    }

    // MARK: Precedence

    static let precedenceCases: [([UInt8], IngestLineError)] = [
        // invalid UTF-8 beats everything, even when a syntax error comes first
        (bytes(#"{"topic":"a",,"x":""#, [0xC0, 0x80], #""}"#), .invalidUTF8),
        (bytes(#"{"topic":"#, [0x80]), .invalidUTF8),
        (bytes(#"{"seq":1,"m":""#, [0xFF], #""}"#), .invalidUTF8),
        (bytes("[", [0xED, 0xA0, 0x80], "]"), .invalidUTF8),
        (bytes(#""#, [0xC3], #"{"topic":"a"}"#), .invalidUTF8),
        // then syntax beats not_object and every field rule
        (bytes(#"{"seq":1,"topic":"a","topic":"b","#, []), .invalidJSON),
        (bytes(#"{"topic":5} x"#, []), .invalidJSON),
        (bytes(#"[{"topic":5}"#, []), .invalidJSON),
        // then not_object
        (bytes(#"[{"seq":1}]"#, []), .notObject),
        // then reserved beats duplicate, invalid values and missing topic
        (bytes(#"{"topic":"a","topic":"b","seq":1}"#, []), .reservedField),
        (bytes(#"{"topic":5,"op":1}"#, []), .reservedField),
        (bytes(#"{"type":5,"op":1}"#, []), .reservedField),
        // then duplicate beats invalid values
        (bytes(#"{"topic":"a b","type":1,"type":"x"}"#, []), .duplicateField),
        // then invalid_topic beats invalid_type
        (bytes(#"{"type":5,"topic":5}"#, []), .invalidTopic),
        // then invalid_type beats missing_topic
        (bytes(#"{"type":5}"#, []), .invalidType),
    ]

    @Test("error precedence", arguments: precedenceCases)
    func precedence(line: [UInt8], expected: IngestLineError) {
        #expect(error(IngestLineParser.parse(line)) == expected)
    }

    // MARK: UTF-8

    static let invalidUTF8Sequences: [[UInt8]] = [
        [0xC0, 0x80], [0xC1, 0xBF],                        // overlong 2-byte
        [0xE0, 0x80, 0x80], [0xE0, 0x9F, 0xBF],            // overlong 3-byte
        [0xF0, 0x80, 0x80, 0x80], [0xF0, 0x8F, 0xBF, 0xBF], // overlong 4-byte
        [0xED, 0xA0, 0x80], [0xED, 0xBF, 0xBF],            // UTF-16 surrogates
        [0xF4, 0x90, 0x80, 0x80], [0xF5, 0x80, 0x80, 0x80], [0xF7, 0xBF, 0xBF, 0xBF], // > U+10FFFF
        [0xF8, 0x88, 0x80, 0x80, 0x80], [0xFE], [0xFF],
        [0x80], [0xBF], [0x80, 0x80],                      // stray continuation
        [0xC3], [0xE2, 0x82], [0xF0, 0x9F, 0x98],          // truncated before the closing quote
        [0xC3, 0x28], [0xE2, 0x28, 0xA1], [0xE2, 0x82, 0x28], [0xF0, 0x28, 0x8C, 0xBC], [0xF0, 0x9F, 0x98, 0x41],
        [0x41, 0xC3, 0xA9, 0xC3],
    ]

    @Test("invalid UTF-8 in a string value", arguments: invalidUTF8Sequences)
    func invalidUTF8InValue(sequence: [UInt8]) {
        #expect(error(IngestLineParser.parse(bytes(#"{"topic":"a","m":""#, sequence, #""}"#))) == .invalidUTF8)
        // and in a key, the topic, a nested string, and cut off at the end of the line
        #expect(error(IngestLineParser.parse(bytes(#"{"topic":"a",""#, sequence, #"":1}"#))) == .invalidUTF8)
        #expect(error(IngestLineParser.parse(bytes(#"{"topic":""#, sequence, #""}"#))) == .invalidUTF8)
        #expect(error(IngestLineParser.parse(bytes(#"{"topic":"a","x":[{"y":""#, sequence, #""}]}"#))) == .invalidUTF8)
        #expect(error(IngestLineParser.parse(bytes(#"{"topic":"a","m":""#, sequence))) == .invalidUTF8)
        // outside strings it is still reported as invalid_utf8, not invalid_json
        #expect(error(IngestLineParser.parse(bytes(#"{"topic":"a"}"#, sequence))) == .invalidUTF8)
        #expect(error(IngestLineParser.parse(bytes("", sequence, #"{"topic":"a"}"#))) == .invalidUTF8)
    }

    static let validUTF8Boundaries: [[UInt8]] = [
        [0xC2, 0x80], [0xDF, 0xBF], [0xE0, 0xA0, 0x80], [0xED, 0x9F, 0xBF], [0xEE, 0x80, 0x80],
        [0xEF, 0xBF, 0xBF], [0xF0, 0x90, 0x80, 0x80], [0xF4, 0x8F, 0xBF, 0xBF], [0xEF, 0xBB, 0xBF],
    ]

    @Test("UTF-8 boundary code points are accepted", arguments: validUTF8Boundaries)
    func validUTF8(sequence: [UInt8]) throws {
        let parsed = try #require(success(IngestLineParser.parse(bytes(#"{"topic":"a","type":""#, sequence, #""}"#))))
        #expect(parsed.type.map { Array($0.utf8) } == sequence)
        #expect(success(IngestLineParser.parse(bytes(#"{"topic":"a",""#, sequence, #"":""#) + sequence + Array(#""}"#.utf8))) != nil)
    }

    // MARK: Topic and type limits

    @Test func topicLength() throws {
        let max = String(repeating: "a", count: 256)
        #expect(success(parse(#"{"topic":"\#(max)"}"#))?.topic == max)
        #expect(error(parse(#"{"topic":"\#(max)b"}"#)) == .invalidTopic)
        #expect(error(parse(#"{"topic":"\#(String(repeating: "ab", count: 1000))"}"#)) == .invalidTopic)
        // the limit applies to the decoded bytes, not the escaped spelling
        let escaped = String(repeating: #"\u0061"#, count: 256)
        #expect(success(parse(#"{"topic":"\#(escaped)"}"#))?.topic == max)
        #expect(error(parse(#"{"topic":"\#(escaped)\u0061"}"#)) == .invalidTopic)
        #expect(error(parse(#"{"topic":"\#(escaped)a"}"#)) == .invalidTopic)
    }

    @Test func typeLength() throws {
        let max = String(repeating: "t", count: 64)
        #expect(success(parse(#"{"topic":"a","type":"\#(max)"}"#))?.type == max)
        #expect(error(parse(#"{"topic":"a","type":"\#(max)x"}"#)) == .invalidType)
        // bytes, not characters: é is two bytes, 😀 four, a lone surrogate becomes U+FFFD (three)
        let e32 = String(repeating: "é", count: 32)
        #expect(success(parse(#"{"topic":"a","type":"\#(e32)"}"#))?.type == e32)
        #expect(error(parse(#"{"topic":"a","type":"\#(e32)x"}"#)) == .invalidType)
        #expect(success(parse(#"{"topic":"a","type":"\#(String(repeating: #"\u00e9"#, count: 32))"}"#))?.type == e32)
        #expect(error(parse(#"{"topic":"a","type":"\#(String(repeating: #"\u00E9"#, count: 33))"}"#)) == .invalidType)
        let smileys = String(repeating: "😀", count: 16)
        #expect(success(parse(#"{"topic":"a","type":"\#(smileys)"}"#))?.type == smileys)
        #expect(success(parse(#"{"topic":"a","type":"\#(String(repeating: #"\ud83d\ude00"#, count: 16))"}"#))?.type == smileys)
        #expect(error(parse(#"{"topic":"a","type":"\#(smileys)x"}"#)) == .invalidType)
        #expect(success(parse(#"{"topic":"a","type":"\#(String(repeating: #"\ud800"#, count: 21))x"}"#)) != nil)
        #expect(error(parse(#"{"topic":"a","type":"\#(String(repeating: #"\ud800"#, count: 21))xy"}"#)) == .invalidType)
    }

    @Test("topic charset, every ASCII byte", arguments: 0..<128)
    func topicCharset(byte: Int) {
        let b = UInt8(byte)
        let allowed = isTopicByte(b)
        // spelled raw where JSON allows it, always also as a \u escape
        let escaped = "\\u00" + String(byte, radix: 16).uppercased().leftPadded(to: 2)
        let raw: String? = (b < 0x20 || b == 0x22 || b == 0x5C) ? nil : String(UnicodeScalar(b))
        for spelling in [raw, escaped].compactMap({ $0 }) {
            let result = parse(#"{"topic":"x\#(spelling)y"}"#)
            if allowed {
                #expect(success(result)?.topic == "x\(String(UnicodeScalar(b)))y", "byte \(byte) as \(spelling)")
            } else {
                #expect(error(result) == .invalidTopic, "byte \(byte) as \(spelling)")
            }
        }
    }

    // MARK: Depth

    @Test func depthLimit() {
        // the top-level object is depth 1, so 511 more levels reach the limit of 512
        func arrays(_ n: Int) -> String {
            #"{"topic":"a","x":"# + String(repeating: "[", count: n) + String(repeating: "]", count: n) + "}"
        }
        func objects(_ n: Int) -> String {
            #"{"topic":"a","x":"# + String(repeating: #"{"seq":"#, count: n) + "1" + String(repeating: "}", count: n) + "}"
        }
        #expect(success(parse(arrays(511))) != nil)
        #expect(error(parse(arrays(512))) == .invalidJSON)
        #expect(success(parse(objects(511))) != nil)
        #expect(error(parse(objects(512))) == .invalidJSON)
        #expect(error(parse(String(repeating: "[", count: 512) + String(repeating: "]", count: 512))) == .notObject)
        #expect(error(parse(String(repeating: "[", count: 513) + String(repeating: "]", count: 513))) == .invalidJSON)
        // hostile nesting is rejected without recursion
        #expect(error(parse(String(repeating: "[", count: 200_000))) == .invalidJSON)
        #expect(error(parse(#"{"topic":"a","x":"# + String(repeating: #"{"a":["#, count: 100_000))) == .invalidJSON)
    }

    @Test func depthIsReleasedWhenContainersClose() {
        // many siblings near the limit must not accumulate depth
        let deep = String(repeating: "[", count: 500) + String(repeating: "]", count: 500)
        let line = #"{"topic":"a","x":["# + Array(repeating: deep, count: 50).joined(separator: ",") + "]}"
        #expect(success(parse(line)) != nil)
        // mixed containers at every depth across the 64-bit word boundaries of the stack
        var mixed = ""
        for level in 0..<511 { mixed += level % 2 == 0 ? "[" : #"{"k":"# }
        for level in (0..<511).reversed() { mixed += level % 2 == 0 ? "]" : "}" }
        #expect(success(parse(#"{"topic":"a","x":\#(mixed)}"#)) != nil)
        // the innermost container (level 510) is an array; close it with a brace instead
        var crossed = ""
        for level in 0..<511 { crossed += level % 2 == 0 ? "[" : #"{"k":"# }
        crossed += "}"
        for level in (0..<510).reversed() { crossed += level % 2 == 0 ? "]" : "}" }
        #expect(error(parse(#"{"topic":"a","x":\#(crossed)}"#)) == .invalidJSON)
    }

    // MARK: String scanning at every alignment

    @Test("special bytes are found at every offset of the word-at-a-time scan", arguments: 0..<24)
    func alignment(offset: Int) {
        let pad = String(repeating: "x", count: offset)
        let tail = String(repeating: "y", count: 11)
        let head = #"{"topic":"a","m":""#
        #expect(success(parse(head + pad + #"\n"# + tail + #""}"#)) != nil)
        #expect(success(parse(head + pad + "é日😀" + tail + #""}"#)) != nil)
        #expect(success(parse(head + pad + #"\""# + tail + #""}"#)) != nil)
        #expect(success(parse(head + pad + "\u{7F}" + tail + #""}"#)) != nil)
        #expect(error(parse(head + pad + "\u{1F}" + tail + #""}"#)) == .invalidJSON)
        #expect(error(parse(head + pad + "\t" + tail + #""}"#)) == .invalidJSON)
        #expect(error(parse(head + pad + #"""# + tail + #""}"#)) == .invalidJSON)
        #expect(error(IngestLineParser.parse(bytes(head + pad, [0xC0, 0xAF], tail + #""}"#))) == .invalidUTF8)
        #expect(error(parse(head + pad)) == .invalidJSON)
        // a topic key and value of every length up to the word size and beyond
        let topic = String(repeating: "t", count: offset + 1)
        #expect(success(parse(#"{"\#(pad)":1,"topic":"\#(topic)"}"#))?.topic == topic)
    }

    // MARK: Robustness

    @Test("every proper prefix of a valid line is rejected", arguments: validLines.map(\.0))
    func prefixesAreRejected(line: String) throws {
        let utf8 = Array(line.utf8)
        let parsed = try #require(success(IngestLineParser.parse(utf8)))
        for cut in 0..<parsed.objectEnd {
            let result = IngestLineParser.parse(Array(utf8[..<cut]))
            let reason = error(result)
            #expect(reason == .invalidJSON || reason == .invalidUTF8, "cut at \(cut): \(result)")
        }
    }

    @Test func randomMutationsNeverCrashAndKeepInvariants() {
        var rng = SplitMix64(state: 0x5EED)
        let seeds = Self.validLines.map { Array($0.0.utf8) }
        let interesting: [UInt8] = Array(#"{}[]",:\u0123456789eE+-.tfnrl "#.utf8) + [0x00, 0x1F, 0x7F, 0x80, 0xBF, 0xC0, 0xC3, 0xED, 0xF4, 0xFF]
        var accepted = 0
        for _ in 0..<20_000 {
            var line = seeds.randomElement(using: &rng)!
            for _ in 0..<Int.random(in: 1...3, using: &rng) {
                let at = Int.random(in: 0..<line.count, using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: line[at] = interesting.randomElement(using: &rng)!
                case 1: line.insert(interesting.randomElement(using: &rng)!, at: at)
                default: if line.count > 1 { line.remove(at: at) }
                }
            }
            guard case .success(let parsed) = IngestLineParser.parse(line) else { continue }
            accepted += 1
            #expect(line[parsed.objectStart] == UInt8(ascii: "{") && line[parsed.objectEnd - 1] == UInt8(ascii: "}"))
            #expect((1...256).contains(parsed.topic.utf8.count) && parsed.topic.utf8.allSatisfy(isTopicByte), "\(parsed.topic)")
            #expect((parsed.type?.utf8.count ?? 0) <= 64)
            #expect(String(validating: line, as: UTF8.self) != nil, "accepted invalid UTF-8: \(line)")
        }
        #expect(accepted > 0)
    }
}

private func isTopicByte(_ b: UInt8) -> Bool {
    (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || Array("_-.:/@=".utf8).contains(b)
}

private extension String {
    func leftPadded(to width: Int) -> String {
        String(repeating: "0", count: Swift.max(0, width - count)) + self
    }
}
