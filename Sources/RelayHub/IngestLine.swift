// IngestLine.swift -- single-pass validation of one ingest line.
//
// Emitters write newline-delimited JSON objects to the ingest socket. The relay
// never re-serializes an event: it republishes `{"seq":N,` followed by the
// original bytes after the object's opening `{`, so subscribers see the content
// exactly as it was written. That splice is only safe when the line is known to
// be one well-formed JSON object, so this file is the gate. It checks a line
// for RFC 8259 syntax and UTF-8 validity and extracts the two routing fields,
// `topic` and `type`, without building a dictionary and without Foundation.
//
// How it works:
//
//  * One forward pass over the bytes. Nesting is tracked with an explicit
//    512-bit stack (bit set = object, clear = array) instead of recursion, so a
//    hostile line cannot exhaust the thread stack and the cost stays O(length)
//    with no heap allocation.
//  * Strings are validated in place: escapes, raw control characters and UTF-8
//    shape. Runs of plain ASCII are skipped eight bytes at a time.
//  * Only top-level keys are decoded, and only far enough to recognise `topic`,
//    `type`, `seq` and `op`. The topic and type values are remembered as byte
//    ranges and decoded once, after the whole line is known to be valid JSON,
//    which is also the only point where Strings are created.
//  * The reported error follows a fixed precedence (see `IngestLineParser.parse`)
//    so the reason sent back to the emitter depends on the line, not on where the
//    scanner happened to stop.

/// Why a line was rejected. `rawValue` is the reason sent back to the emitter and used as a metrics label.
public enum IngestLineError: String, Error, Sendable, Equatable {
    case invalidUTF8 = "invalid_utf8"
    case invalidJSON = "invalid_json"
    case notObject = "not_object"
    case missingTopic = "missing_topic"
    case invalidTopic = "invalid_topic"
    case invalidType = "invalid_type"
    case duplicateField = "duplicate_field"   // topic or type given twice
    case reservedField = "reserved_field"     // seq or op present
    case tooLong = "line_too_long"            // used by the caller, never returned by parse
    case forbiddenTopic = "forbidden_topic"   // used by the caller: no --publish-grant covers the topic
}

/// A validated ingest line: where the object is within the line, and its routing fields.
public struct IngestLine: Sendable, Equatable {
    public var topic: String
    public var type: String?
    /// Offset of the opening `{` within the parsed bytes.
    public var objectStart: Int
    /// Offset one past the closing `}` within the parsed bytes.
    public var objectEnd: Int
}

public enum IngestLineParser {
    /// Deeper nesting is refused so that a line cannot make later consumers
    /// (subscribers' JSON parsers, which usually recurse) work unboundedly.
    /// The top-level object counts as depth 1.
    static let maxDepth = 512
    /// Topics become subscription keys and metric labels; keep them short.
    static let maxTopicBytes = TopicName.maximumLength
    /// `type` is a routing hint for subscribers, not content.
    static let maxTypeBytes = 64

    /// Validates one line (without its `\n`); never allocates for the content except topic/type strings.
    ///
    /// The error reported is the first of these that applies, so it depends on
    /// the line alone and not on scanning order:
    ///
    /// 1. `invalid_utf8`: the line is not valid UTF-8 anywhere, inside or outside
    ///    strings (overlong forms, encoded surrogates, > U+10FFFF, truncated or
    ///    stray continuation bytes).
    /// 2. `invalid_json`: not exactly one RFC 8259 value surrounded by optional
    ///    whitespace, or nesting deeper than 512. Well-formed non-ASCII
    ///    characters outside strings (a BOM, U+00A0) land here.
    /// 3. `not_object`: a valid JSON value that is not an object. A line that
    ///    starts like an array/string/number but is malformed is `invalid_json`.
    /// 4. `reserved_field`: the top-level object has a `seq` or `op` key.
    /// 5. `duplicate_field`: `topic` or `type` appears more than once.
    /// 6. `invalid_topic`: `topic` is not a string of 1...256 bytes from
    ///    `A-Z a-z 0-9 _ - . : / @ =`.
    /// 7. `invalid_type`: `type` is not a string of at most 64 UTF-8 bytes
    ///    (an empty string is allowed).
    /// 8. `missing_topic`.
    ///
    /// Keys and values are compared after decoding escapes (`"to\u0070ic"` is
    /// `topic`). Lone surrogate escapes are accepted and decode to U+FFFD.
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> Result<IngestLine, IngestLineError> {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return .failure(.invalidJSON) }
        let p = base.assumingMemoryBound(to: UInt8.self)
        let n = bytes.count

        let scanned: Result<TopLevel, IngestLineError> =
            withUnsafeTemporaryAllocation(of: UInt64.self, capacity: maxDepth / 64) { stack in
                stack.initialize(repeating: 0)
                var scanner = Scanner(p: p, n: n, stack: stack.baseAddress!)
                do throws(IngestLineError) {
                    try scanner.run()
                    return .success(scanner.top)
                } catch {
                    return .failure(error)
                }
            }

        switch scanned {
        case .failure(.invalidJSON):
            // The scanner stops at the first syntax error; bad UTF-8 further on
            // must still win, so check the whole line on this (cold) path.
            return .failure(isValidUTF8(p, n) ? .invalidJSON : .invalidUTF8)
        case .failure(let error):
            return .failure(error)
        case .success(let top):
            return routingFields(p, top)
        }
    }
}

extension IngestLineParser {
    /// Convenience for tests and callers holding an array.
    public static func parse(_ bytes: [UInt8]) -> Result<IngestLine, IngestLineError> {
        bytes.withUnsafeBytes { parse($0) }
    }
}

// MARK: - Field rules

extension IngestLineParser {
    /// Applies the field rules once the line is known to be a valid JSON object,
    /// so field errors never mask a syntax or encoding error later in the line.
    private static func routingFields(_ p: UnsafePointer<UInt8>, _ top: TopLevel) -> Result<IngestLine, IngestLineError> {
        guard top.isObject else { return .failure(.notObject) }
        if top.reserved { return .failure(.reservedField) }
        if top.topic.count > 1 || top.type.count > 1 { return .failure(.duplicateField) }

        var topic: String?
        if top.topic.count == 1 {
            guard top.topic.isString, let t = decodeTopic(p, top.topic) else { return .failure(.invalidTopic) }
            topic = t
        }
        var type: String?
        if top.type.count == 1 {
            guard top.type.isString, let t = decodeType(p, top.type) else { return .failure(.invalidType) }
            type = t
        }
        guard let topic else { return .failure(.missingTopic) }
        return .success(IngestLine(topic: topic, type: type, objectStart: top.objectStart, objectEnd: top.objectEnd))
    }

    private static func decodeTopic(_ p: UnsafePointer<UInt8>, _ field: FieldValue) -> String? {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: maxTopicBytes) { buf in
            var count = 0
            let complete = decodeStringBody(p, from: field.start, to: field.end) { b in
                guard count < maxTopicBytes, TopicName.isTopicByte(b) else { return false }
                buf[count] = b
                count &+= 1
                return true
            }
            guard complete, count > 0 else { return nil }
            return String(decoding: UnsafeBufferPointer(rebasing: buf[0..<count]), as: UTF8.self)
        }
    }

    private static func decodeType(_ p: UnsafePointer<UInt8>, _ field: FieldValue) -> String? {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: maxTypeBytes) { buf in
            var count = 0
            let complete = decodeStringBody(p, from: field.start, to: field.end) { b in
                guard count < maxTypeBytes else { return false }
                buf[count] = b
                count &+= 1
                return true
            }
            guard complete else { return nil }
            return String(decoding: UnsafeBufferPointer(rebasing: buf[0..<count]), as: UTF8.self)
        }
    }
}

// MARK: - Scanner

/// Which top-level key a value belongs to; only these need remembering.
private enum Field: UInt8 {
    case other, topic, type
}

/// Where the value of `topic` or `type` was, as the raw (still escaped) string
/// body. Only one occurrence matters: a second one is a duplicate_field error.
private struct FieldValue {
    var count = 0
    var isString = false
    var start = 0
    var end = 0
}

/// What the structural pass learned about the top level, for the field rules.
private struct TopLevel {
    var isObject = false
    var objectStart = 0
    var objectEnd = 0
    var reserved = false
    var topic = FieldValue()
    var type = FieldValue()
}

private enum Byte {
    static let quote = UInt8(ascii: "\"")
    static let backslash = UInt8(ascii: "\\")
    static let openBrace = UInt8(ascii: "{")
    static let closeBrace = UInt8(ascii: "}")
    static let openBracket = UInt8(ascii: "[")
    static let closeBracket = UInt8(ascii: "]")
    static let comma = UInt8(ascii: ",")
    static let colon = UInt8(ascii: ":")
    static let minus = UInt8(ascii: "-")
    static let plus = UInt8(ascii: "+")
    static let dot = UInt8(ascii: ".")
    static let zero = UInt8(ascii: "0")
    static let one = UInt8(ascii: "1")
    static let nine = UInt8(ascii: "9")
    static let lowerE = UInt8(ascii: "e")
    static let lowerU = UInt8(ascii: "u")
}

/// Keys packed little-endian into a word, compared together with their length
/// so that e.g. `"op\u0000"` is not `op`.
private enum Key {
    static let topic: UInt64 = 0x63_69_70_6F_74  // "topic"
    static let type: UInt64 = 0x65_70_79_74      // "type"
    static let seq: UInt64 = 0x71_65_73          // "seq"
    static let op: UInt64 = 0x70_6F              // "op"
}

private struct Scanner {
    let p: UnsafePointer<UInt8>
    let n: Int
    /// One bit per open container, bit `depth - 1`: set for objects.
    let stack: UnsafeMutablePointer<UInt64>
    var i = 0
    var depth = 0
    var top = TopLevel()

    init(p: UnsafePointer<UInt8>, n: Int, stack: UnsafeMutablePointer<UInt64>) {
        self.p = p
        self.n = n
        self.stack = stack
    }

    /// Validates the whole line as one JSON value, recording top-level facts.
    /// Written as a loop over "a value starts here" with an inner loop over
    /// "a value just ended", instead of recursion.
    mutating func run() throws(IngestLineError) {
        skipWhitespace()
        guard i < n else { throw .invalidJSON }
        top.isObject = p[i] == Byte.openBrace
        top.objectStart = i

        var pending = Field.other
        nextValue: while true {
            skipWhitespace()
            guard i < n else { throw .invalidJSON }
            let c = p[i]
            // A routing field's value counts only if it is a string (recorded
            // below); anything else leaves it unrecorded and so invalid.
            let field = pending
            pending = .other

            switch c {
            case Byte.openBrace:
                try push(object: true)
                i &+= 1
                skipWhitespace()
                guard i < n else { throw .invalidJSON }
                if p[i] != Byte.closeBrace {
                    pending = try scanKeyAndColon()
                    continue nextValue
                }
                i &+= 1
                depth &-= 1
            case Byte.openBracket:
                try push(object: false)
                i &+= 1
                skipWhitespace()
                guard i < n else { throw .invalidJSON }
                if p[i] != Byte.closeBracket { continue nextValue }
                i &+= 1
                depth &-= 1
            case Byte.quote:
                let start = i &+ 1
                try scanString()
                if field != .other { record(field, start: start, end: i &- 1) }
            case Byte.minus, Byte.zero...Byte.nine:
                try scanNumber()
            case UInt8(ascii: "t"):
                try expectLiteral(0x65_75_72_74, length: 4)      // "true"
            case UInt8(ascii: "f"):
                try expectLiteral(0x65_73_6C_61_66, length: 5)   // "false"
            case UInt8(ascii: "n"):
                try expectLiteral(0x6C_6C_75_6E, length: 4)      // "null"
            default:
                throw .invalidJSON
            }

            // A value just ended: close containers or move to the next element.
            while true {
                if depth == 0 {
                    top.objectEnd = i
                    skipWhitespace()
                    guard i == n else { throw .invalidJSON }
                    return
                }
                skipWhitespace()
                guard i < n else { throw .invalidJSON }
                let c = p[i]
                let inObject = topIsObject
                if c == Byte.comma {
                    i &+= 1
                    if inObject {
                        skipWhitespace()
                        pending = try scanKeyAndColon()
                    }
                    continue nextValue
                }
                guard c == (inObject ? Byte.closeBrace : Byte.closeBracket) else { throw .invalidJSON }
                i &+= 1
                depth &-= 1
            }
        }
    }

    // MARK: Containers

    @inline(__always)
    mutating func push(object: Bool) throws(IngestLineError) {
        guard depth < IngestLineParser.maxDepth else { throw .invalidJSON }
        let bit = depth
        depth &+= 1
        let mask: UInt64 = 1 &<< UInt64(bit & 63)
        if object {
            stack[bit &>> 6] |= mask
        } else {
            stack[bit &>> 6] &= ~mask
        }
    }

    var topIsObject: Bool {
        @inline(__always) get {
            let bit = depth &- 1
            return (stack[bit &>> 6] &>> UInt64(bit & 63)) & 1 != 0
        }
    }

    // MARK: Top-level fields

    /// Parses `"key" ws :` and, for keys of the top-level object, notes reserved
    /// and routing keys. Returns which routing field the following value is for.
    @inline(__always)
    mutating func scanKeyAndColon() throws(IngestLineError) -> Field {
        guard i < n, p[i] == Byte.quote else { throw .invalidJSON }
        let start = i &+ 1
        let escaped = try scanString()
        var field = Field.other
        if depth == 1 {
            field = classifyTopLevelKey(start: start, end: i &- 1, escaped: escaped)
        }
        skipWhitespace()
        guard i < n, p[i] == Byte.colon else { throw .invalidJSON }
        i &+= 1
        return field
    }

    mutating func classifyTopLevelKey(start: Int, end: Int, escaped: Bool) -> Field {
        let rawLength = end &- start
        var packed: UInt64 = 0
        var length = 0
        if !escaped {
            guard rawLength >= 2, rawLength <= 5 else { return .other }
            for k in 0..<rawLength {
                packed |= UInt64(p[start &+ k]) &<< UInt64(8 &* k)
            }
            length = rawLength
        } else {
            // Each decoded byte of an ASCII key costs at most 6 raw bytes (\uXXXX).
            guard rawLength <= 5 &* 6 else { return .other }
            let fits = decodeStringBody(p, from: start, to: end) { b in
                guard length < 5 else { return false }
                packed |= UInt64(b) &<< UInt64(8 &* length)
                length &+= 1
                return true
            }
            guard fits else { return .other }
        }
        switch (length, packed) {
        case (5, Key.topic):
            top.topic.count &+= 1
            return .topic
        case (4, Key.type):
            top.type.count &+= 1
            return .type
        case (3, Key.seq), (2, Key.op):
            top.reserved = true
            return .other
        default:
            return .other
        }
    }

    mutating func record(_ field: Field, start: Int, end: Int) {
        switch field {
        case .topic: (top.topic.isString, top.topic.start, top.topic.end) = (true, start, end)
        case .type: (top.type.isString, top.type.start, top.type.end) = (true, start, end)
        case .other: break
        }
    }

    // MARK: Scalars

    @inline(__always)
    mutating func skipWhitespace() {
        while i < n {
            let b = p[i]
            guard b == 0x20 || b == 0x0A || b == 0x0D || b == 0x09 else { return }
            i &+= 1
        }
    }

    /// Compares the literal as one packed word; called with `p[i]` already matching its first byte.
    @inline(__always)
    mutating func expectLiteral(_ packed: UInt64, length: Int) throws(IngestLineError) {
        guard n &- i >= length else { throw .invalidJSON }
        var word: UInt64 = 0
        for k in 0..<length {
            word |= UInt64(p[i &+ k]) &<< UInt64(8 &* k)
        }
        guard word == packed else { throw .invalidJSON }
        i &+= length
    }

    /// `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?`; whatever follows is
    /// judged by the caller, which is how `01` and `1.2.3` get rejected.
    @inline(__always)
    mutating func scanNumber() throws(IngestLineError) {
        if p[i] == Byte.minus { i &+= 1 }
        guard i < n else { throw .invalidJSON }
        let first = p[i]
        if first == Byte.zero {
            i &+= 1
        } else if first >= Byte.one && first <= Byte.nine {
            i &+= 1
            skipDigits()
        } else {
            throw .invalidJSON
        }
        if i < n && p[i] == Byte.dot {
            i &+= 1
            try requireDigits()
        }
        if i < n && (p[i] | 0x20) == Byte.lowerE {
            i &+= 1
            if i < n && (p[i] == Byte.plus || p[i] == Byte.minus) { i &+= 1 }
            try requireDigits()
        }
    }

    @inline(__always)
    mutating func requireDigits() throws(IngestLineError) {
        guard i < n, p[i] &- Byte.zero < 10 else { throw .invalidJSON }
        i &+= 1
        skipDigits()
    }

    @inline(__always)
    mutating func skipDigits() {
        while i < n && p[i] &- Byte.zero < 10 { i &+= 1 }
    }

    // MARK: Strings

    /// Validates a string starting at its opening quote and leaves `i` after the
    /// closing one. Returns whether it contained escapes, so keys without any can
    /// be compared raw.
    @discardableResult
    @inline(__always)
    mutating func scanString() throws(IngestLineError) -> Bool {
        i &+= 1
        var escaped = false
        while true {
            skipPlainASCII()
            guard i < n else { throw .invalidJSON }
            let b = p[i]
            if b == Byte.quote {
                i &+= 1
                return escaped
            } else if b == Byte.backslash {
                escaped = true
                try scanEscape()
            } else if b < 0x20 {
                throw .invalidJSON
            } else {
                let length = utf8SequenceLength(p, i, n)
                guard length != 0 else { throw .invalidUTF8 }
                i &+= length
            }
        }
    }

    /// Advances over bytes needing no attention in a string (ASCII other than
    /// `"`, `\` and controls), a word at a time while eight bytes remain. The
    /// lowest flagged byte of each SWAR test is exact, so the first special byte
    /// is found without rescanning.
    @inline(__always)
    mutating func skipPlainASCII() {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        while n &- i >= 8 {
            let w = UInt64(littleEndian: UnsafeRawPointer(p + i).loadUnaligned(as: UInt64.self))
            let q = w ^ (ones &* 0x22)
            let bs = w ^ (ones &* 0x5C)
            let special = (((w &- ones &* 0x20) & ~w)
                | ((q &- ones) & ~q)
                | ((bs &- ones) & ~bs)
                | w) & highs
            if special != 0 {
                i &+= special.trailingZeroBitCount &>> 3
                return
            }
            i &+= 8
        }
        while i < n {
            let b = p[i]
            guard b >= 0x20, b < 0x80, b != Byte.quote, b != Byte.backslash else { return }
            i &+= 1
        }
    }

    /// Called at a backslash; accepts the RFC 8259 escapes. `\u` surrogates are
    /// not paired here: lone ones are accepted and decode to U+FFFD.
    @inline(__always)
    mutating func scanEscape() throws(IngestLineError) {
        guard n &- i >= 2 else { throw .invalidJSON }
        switch p[i &+ 1] {
        case Byte.quote, Byte.backslash, UInt8(ascii: "/"), UInt8(ascii: "b"),
             UInt8(ascii: "f"), UInt8(ascii: "n"), UInt8(ascii: "r"), UInt8(ascii: "t"):
            i &+= 2
        case Byte.lowerU:
            guard n &- i >= 6,
                  isHex(p[i &+ 2]), isHex(p[i &+ 3]), isHex(p[i &+ 4]), isHex(p[i &+ 5])
            else { throw .invalidJSON }
            i &+= 6
        default:
            throw .invalidJSON
        }
    }
}

// MARK: - Shared byte helpers

@inline(__always)
private func isHex(_ b: UInt8) -> Bool {
    b &- UInt8(ascii: "0") < 10 || (b | 0x20) &- UInt8(ascii: "a") < 6
}

/// Value of a byte already known to be a hex digit.
@inline(__always)
private func hexValue(_ b: UInt8) -> UInt32 {
    UInt32(b & 0x0F) &+ UInt32(b &>> 6) &* 9
}

@inline(__always)
private func hex4(_ p: UnsafePointer<UInt8>, _ i: Int) -> UInt32 {
    hexValue(p[i]) &<< 12 | hexValue(p[i &+ 1]) &<< 8 | hexValue(p[i &+ 2]) &<< 4 | hexValue(p[i &+ 3])
}

/// Length of the well-formed UTF-8 sequence whose lead byte (>= 0x80) is at
/// `i`, or 0. Follows the Unicode table of well-formed byte sequences, which is
/// what excludes overlongs, encoded surrogates and code points past U+10FFFF.
@inline(__always)
private func utf8SequenceLength(_ p: UnsafePointer<UInt8>, _ i: Int, _ n: Int) -> Int {
    let b0 = p[i]
    let remaining = n &- i
    @inline(__always) func isContinuation(_ b: UInt8) -> Bool { b & 0xC0 == 0x80 }

    if b0 < 0xC2 { return 0 }  // stray continuation, or overlong C0/C1
    if b0 < 0xE0 {
        return remaining >= 2 && isContinuation(p[i &+ 1]) ? 2 : 0
    }
    if b0 < 0xF0 {
        guard remaining >= 3 else { return 0 }
        let b1 = p[i &+ 1]
        let low: UInt8 = b0 == 0xE0 ? 0xA0 : 0x80
        let high: UInt8 = b0 == 0xED ? 0x9F : 0xBF
        guard b1 >= low, b1 <= high, isContinuation(p[i &+ 2]) else { return 0 }
        return 3
    }
    if b0 < 0xF5 {
        guard remaining >= 4 else { return 0 }
        let b1 = p[i &+ 1]
        let low: UInt8 = b0 == 0xF0 ? 0x90 : 0x80
        let high: UInt8 = b0 == 0xF4 ? 0x8F : 0xBF
        guard b1 >= low, b1 <= high, isContinuation(p[i &+ 2]), isContinuation(p[i &+ 3]) else { return 0 }
        return 4
    }
    return 0
}

/// Whole-line check used only after a syntax error, so that bad UTF-8 anywhere
/// is reported as such regardless of where the syntax error was.
private func isValidUTF8(_ p: UnsafePointer<UInt8>, _ n: Int) -> Bool {
    var i = 0
    while i < n {
        if p[i] < 0x80 {
            i &+= 1
            continue
        }
        let length = utf8SequenceLength(p, i, n)
        guard length != 0 else { return false }
        i &+= length
    }
    return true
}

/// Decodes the body of a string that the scanner already validated, handing
/// each UTF-8 byte to `sink` until it returns false (then returns false).
/// Surrogate pairs are combined; lone surrogates become U+FFFD so the result is
/// always valid UTF-8.
@inline(__always)
private func decodeStringBody(
    _ p: UnsafePointer<UInt8>, from start: Int, to end: Int, _ sink: (UInt8) -> Bool
) -> Bool {
    var i = start
    while i < end {
        let b = p[i]
        if b != Byte.backslash {
            guard sink(b) else { return false }
            i &+= 1
            continue
        }
        let e = p[i &+ 1]
        i &+= 2
        var scalar: UInt32
        switch e {
        case UInt8(ascii: "b"): scalar = 0x08
        case UInt8(ascii: "f"): scalar = 0x0C
        case UInt8(ascii: "n"): scalar = 0x0A
        case UInt8(ascii: "r"): scalar = 0x0D
        case UInt8(ascii: "t"): scalar = 0x09
        case Byte.lowerU:
            scalar = hex4(p, i)
            i &+= 4
            if scalar & 0xFC00 == 0xD800, end &- i >= 6,
               p[i] == Byte.backslash, p[i &+ 1] == Byte.lowerU {
                let low = hex4(p, i &+ 2)
                if low & 0xFC00 == 0xDC00 {
                    scalar = 0x10000 &+ ((scalar &- 0xD800) &<< 10) &+ (low &- 0xDC00)
                    i &+= 6
                }
            }
            if scalar & 0xF800 == 0xD800, scalar < 0x10000 { scalar = 0xFFFD }
        default:
            scalar = UInt32(e)  // " \ /
        }
        if scalar < 0x80 {
            guard sink(UInt8(scalar)) else { return false }
        } else if scalar < 0x800 {
            guard sink(UInt8(0xC0 | scalar &>> 6)),
                  sink(UInt8(0x80 | scalar & 0x3F)) else { return false }
        } else if scalar < 0x10000 {
            guard sink(UInt8(0xE0 | scalar &>> 12)),
                  sink(UInt8(0x80 | (scalar &>> 6) & 0x3F)),
                  sink(UInt8(0x80 | scalar & 0x3F)) else { return false }
        } else {
            guard sink(UInt8(0xF0 | scalar &>> 18)),
                  sink(UInt8(0x80 | (scalar &>> 12) & 0x3F)),
                  sink(UInt8(0x80 | (scalar &>> 6) & 0x3F)),
                  sink(UInt8(0x80 | scalar & 0x3F)) else { return false }
        }
    }
    return true
}
