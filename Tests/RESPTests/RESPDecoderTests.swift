// Tests of RESPDecoder: every value type, every reply split at every byte
// boundary (issue 13, test 13), pipelining, malformed input, limits, and that
// payloads are slices of the read buffer rather than copies.

import NIOCore
import Testing

@testable import RESP

/// Every byte value, with CR LF pairs and lone CRs and LFs among them.
let allBytes: [UInt8] = Array(0...255) + [13, 10, 13, 13, 10, 10]

/// Replies of every shape, as Redis would send them, with the value each decodes to.
let wellFormedReplies: [(String, [UInt8], RESPValue)] = [
    ("status", bytes("+OK\r\n"), simple("OK")),
    ("empty status", bytes("+\r\n"), simple("")),
    ("error", bytes("-ERR unknown command 'FOO'\r\n"), error("ERR unknown command 'FOO'")),
    ("NOSCRIPT error", bytes("-NOSCRIPT No matching script.\r\n"), error("NOSCRIPT No matching script.")),
    ("empty error", bytes("-\r\n"), error("")),
    ("zero", bytes(":0\r\n"), .integer(0)),
    ("integer", bytes(":1000\r\n"), .integer(1000)),
    ("negative integer", bytes(":-42\r\n"), .integer(-42)),
    ("Int64.max", bytes(":9223372036854775807\r\n"), .integer(.max)),
    ("Int64.min", bytes(":-9223372036854775808\r\n"), .integer(.min)),
    ("bulk", bytes("$6\r\nfoobar\r\n"), bulk("foobar")),
    ("empty bulk", bytes("$0\r\n\r\n"), bulk("")),
    ("null bulk", bytes("$-1\r\n"), .bulkString(nil)),
    ("bulk of CR LF", bytes("$4\r\n\r\n\r\n\r\n"), bulk("\r\n\r\n")),
    ("bulk of all bytes", bytes("$\(allBytes.count)\r\n") + allBytes + bytes("\r\n"), bulk(allBytes)),
    ("bulk that looks like a reply", bytes("$8\r\n*1\r\n:1\r\n\r\n"), bulk("*1\r\n:1\r\n")),
    ("empty array", bytes("*0\r\n"), .array([])),
    ("null array", bytes("*-1\r\n"), .array(nil)),
    (
        "array of every type", bytes("*7\r\n+OK\r\n-ERR x\r\n:-1\r\n$1\r\n\n\r\n$-1\r\n*0\r\n*-1\r\n"),
        .array([simple("OK"), error("ERR x"), .integer(-1), bulk("\n"), .bulkString(nil), .array([]), .array(nil)])
    ),
    (
        "nested arrays", bytes("*3\r\n*2\r\n:1\r\n*1\r\n$1\r\na\r\n*0\r\n*1\r\n*1\r\n*-1\r\n"),
        .array([.array([.integer(1), .array([bulk("a")])]), .array([]), .array([.array([.array(nil)])])])
    ),
    (
        "script reply {seq, epoch}", bytes("*2\r\n:17\r\n$12\r\nAbCdEf012345\r\n"),
        .array([.integer(17), bulk("AbCdEf012345")])
    ),
    (
        "XREVRANGE reply",
        bytes("*2\r\n*2\r\n$3\r\n2-0\r\n*2\r\n$1\r\nd\r\n$9\r\n{\"n\":2}\r\n\r\n")
            + bytes("*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nd\r\n$7\r\n{\"n\":1}\r\n"),
        .array([
            .array([bulk("2-0"), .array([bulk("d"), bulk("{\"n\":2}\r\n")])]),
            .array([bulk("1-0"), .array([bulk("d"), bulk("{\"n\":1}")])]),
        ])
    ),
    (
        "pub/sub message", bytes("*3\r\n$7\r\nmessage\r\n$4\r\nP:tT\r\n$5\r\n1:e:x\r\n"),
        .array([bulk("message"), bulk("P:tT"), bulk("1:e:x")])
    ),
    (
        "32 nested arrays (the default limit)", Array(repeating: bytes("*1\r\n"), count: 32).joined() + bytes(":1\r\n"),
        (0..<32).reduce(RESPValue.integer(1)) { inner, _ in .array([inner]) }
    ),
]

/// Bad input and the error it must raise, with the offset of the offending byte.
let malformedReplies: [(String, [UInt8], RESPError)] = [
    ("unknown type byte", bytes("?OK\r\n"), RESPError(.badTypeByte(UInt8(ascii: "?")), offset: 0)),
    ("RESP3 map type", bytes("%1\r\n"), RESPError(.badTypeByte(UInt8(ascii: "%")), offset: 0)),
    ("inline text", bytes("OK\r\n"), RESPError(.badTypeByte(UInt8(ascii: "O")), offset: 0)),
    ("type byte CR", bytes("\r\n"), RESPError(.badTypeByte(13), offset: 0)),
    ("bad type byte in an array", bytes("*2\r\n:1\r\n!x\r\n"), RESPError(.badTypeByte(UInt8(ascii: "!")), offset: 8)),
    ("integer with no digits", bytes(":\r\n"), RESPError(.badInteger, offset: 1)),
    ("integer minus alone", bytes(":-\r\n"), RESPError(.badInteger, offset: 2)),
    ("integer with letters", bytes(":12a\r\n"), RESPError(.badInteger, offset: 3)),
    ("integer with a plus sign", bytes(":+1\r\n"), RESPError(.badInteger, offset: 1)),
    ("integer with a fraction", bytes(":1.5\r\n"), RESPError(.badInteger, offset: 2)),
    ("integer with two minus signs", bytes(":--1\r\n"), RESPError(.badInteger, offset: 2)),
    ("integer with a space", bytes(": 1\r\n"), RESPError(.badInteger, offset: 1)),
    ("integer above Int64.max", bytes(":9223372036854775808\r\n"), RESPError(.badInteger, offset: 19)),
    ("integer below Int64.min", bytes(":-9223372036854775809\r\n"), RESPError(.badInteger, offset: 20)),
    ("integer of 20 digits", bytes(":00000000000000000001\r\n"), RESPError(.badInteger, offset: 20)),
    ("bulk length with no digits", bytes("$\r\n"), RESPError(.badLength, offset: 1)),
    ("bulk length with letters", bytes("$abc\r\n"), RESPError(.badLength, offset: 1)),
    ("bulk length -2", bytes("$-2\r\n"), RESPError(.badLength, offset: 1)),
    ("bulk length huge", bytes("$99999999999999999999\r\n"), RESPError(.badLength, offset: 19)),
    ("array length with letters", bytes("*x\r\n"), RESPError(.badLength, offset: 1)),
    ("array length -5", bytes("*-5\r\n"), RESPError(.badLength, offset: 1)),
    ("status with a bare LF", bytes("+OK\n"), RESPError(.missingCRLF, offset: 3)),
    ("status with a lone CR", bytes("+O\rK\r\n"), RESPError(.missingCRLF, offset: 3)),
    ("error with a bare LF", bytes("-ERR\nx\r\n"), RESPError(.missingCRLF, offset: 4)),
    ("integer ended by LF", bytes(":1\n"), RESPError(.missingCRLF, offset: 2)),
    ("integer ended by CR CR", bytes(":1\r\r"), RESPError(.missingCRLF, offset: 3)),
    ("length ended by LF", bytes("$1\na\r\n"), RESPError(.missingCRLF, offset: 2)),
    ("bulk payload longer than declared", bytes("$1\r\nab\r\n"), RESPError(.missingCRLF, offset: 5)),
    ("bulk payload shorter than declared", bytes("$3\r\nab\r\n:1\r\n"), RESPError(.missingCRLF, offset: 7)),
    ("bulk payload followed by CR only", bytes("$1\r\na\rX"), RESPError(.missingCRLF, offset: 6)),
    ("empty bulk without CRLF", bytes("$0\r\nxx"), RESPError(.missingCRLF, offset: 4)),
    (
        "33 nested arrays", Array(repeating: bytes("*1\r\n"), count: 33).joined() + bytes(":1\r\n"),
        RESPError(.tooDeep(limit: 32), offset: 128)
    ),
    (
        "33rd nested array empty", Array(repeating: bytes("*1\r\n"), count: 32).joined() + bytes("*0\r\n"),
        RESPError(.tooDeep(limit: 32), offset: 128)
    ),
    (
        "bulk above 64 MiB", bytes("$67108865\r\n"),
        RESPError(.bulkTooLong(length: 67_108_865, limit: 64 << 20), offset: 1)
    ),
    (
        "bulk of 512 MiB", bytes("$536870912\r\n"),
        RESPError(.bulkTooLong(length: 536_870_912, limit: 64 << 20), offset: 1)
    ),
    (
        "array above 1M elements", bytes("*1048577\r\n"),
        RESPError(.arrayTooLong(length: 1_048_577, limit: 1 << 20), offset: 1)
    ),
    (
        "array of Int64.max elements", bytes("*9223372036854775807\r\n"),
        RESPError(.arrayTooLong(length: .max, limit: 1 << 20), offset: 1)
    ),
    (
        "status above 64 KiB", bytes("+") + Array(repeating: UInt8(ascii: "a"), count: 65537),
        RESPError(.lineTooLong(limit: 65536), offset: 65537)
    ),
]

@Suite("RESPDecoder")
struct RESPDecoderTests {
    @Test("each reply decodes whole", arguments: wellFormedReplies)
    func decodesWhole(name: String, input: [UInt8], expected: RESPValue) throws {
        var buffer = ByteBuffer(bytes: input)
        var decoder = RESPDecoder()
        let value = try decoder.decode(buffer: &buffer)
        #expect(value == expected, "\(name)")
        #expect(buffer.readableBytes == 0)
        #expect(try decoder.decode(buffer: &buffer) == nil)
    }

    @Test("the encoder writes each reply byte for byte as Redis does", arguments: wellFormedReplies)
    func encodesAsRedis(name: String, input: [UInt8], expected: RESPValue) {
        #expect(encoded(expected) == input, "\(name)")
    }

    @Test("each reply split at every byte boundary decodes the same", arguments: wellFormedReplies)
    func splitAtEveryBoundary(name: String, input: [UInt8], expected: RESPValue) {
        for cut in 0...input.count {
            for compact in [false, true] {
                let outcome = feed(input, cuts: [cut], compact: compact)
                #expect(outcome == Outcome(values: [expected]), "\(name) cut at \(cut)")
            }
        }
    }

    @Test("each reply split at every pair of boundaries decodes the same", arguments: wellFormedReplies)
    func splitAtEveryPairOfBoundaries(name: String, input: [UInt8], expected: RESPValue) {
        guard input.count <= 160 else { return }  // the two long ones are covered by the other tests
        for first in 0...input.count {
            for second in first...input.count {
                let outcome = feed(input, cuts: [first, second])
                #expect(outcome == Outcome(values: [expected]), "\(name) cut at \(first) and \(second)")
            }
        }
    }

    @Test("each reply fed byte by byte decodes the same", arguments: wellFormedReplies)
    func byteByByte(name: String, input: [UInt8], expected: RESPValue) {
        #expect(feedByteByByte(input) == Outcome(values: [expected]), "\(name)")
        #expect(feedByteByByte(input, compact: true) == Outcome(values: [expected]), "\(name), compacting")
    }

    @Test func partialReplyReturnsNilAndLeavesTheBufferAlone() throws {
        var decoder = RESPDecoder()
        let input = bytes("*2\r\n$5\r\nhello\r\n$5\r\nworld\r\n")
        var buffer = ByteBuffer(bytes: input.prefix(20))
        for _ in 0..<3 {
            #expect(try decoder.decode(buffer: &buffer) == nil)
            #expect(buffer.readerIndex == 0 && buffer.readableBytes == 20)
        }
        buffer.writeBytes(input.dropFirst(20))
        #expect(try decoder.decode(buffer: &buffer) == .array([bulk("hello"), bulk("world")]))
        #expect(buffer.readableBytes == 0)
    }

    @Test func decodesFromANonZeroReaderIndex() throws {
        var buffer = ByteBuffer(string: "garbage+OK\r\n:5\r\n")
        buffer.moveReaderIndex(forwardBy: 7)
        var decoder = RESPDecoder()
        #expect(try decoder.decode(buffer: &buffer) == simple("OK"))
        #expect(try decoder.decode(buffer: &buffer) == .integer(5))
        #expect(buffer.readableBytes == 0)
    }

    @Test func emptyBufferNeedsMoreData() throws {
        var buffer = ByteBuffer()
        var decoder = RESPDecoder()
        #expect(try decoder.decode(buffer: &buffer) == nil)
    }

    // MARK: Pipelining

    @Test func pipelinedRepliesDecodeInOrder() {
        let all = wellFormedReplies.flatMap(\.1)
        let expected = wellFormedReplies.map(\.2)
        #expect(feed(all) == Outcome(values: expected))
        #expect(feedByteByByte(all) == Outcome(values: expected))
        #expect(feedByteByByte(all, compact: true) == Outcome(values: expected))
    }

    @Test func pipelinedRepliesSplitAtEveryBoundary() {
        let replies = wellFormedReplies.filter { $0.1.count < 100 }
        let all = replies.flatMap(\.1)
        let expected = Outcome(values: replies.map(\.2))
        for cut in 0...all.count {
            #expect(feed(all, cuts: [cut]) == expected, "cut at \(cut)")
            #expect(feed(all, cuts: [cut], compact: true) == expected, "cut at \(cut), compacting")
        }
    }

    @Test func aReplyAfterAnErrorIsStillRead() {
        // An error reply is a value like any other: the stream goes on.
        let input = bytes("-NOSCRIPT No matching script.\r\n*2\r\n:1\r\n$1\r\ne\r\n")
        #expect(feed(input).values == [error("NOSCRIPT No matching script."), .array([.integer(1), bulk("e")])])
    }

    // MARK: Malformed input

    @Test("malformed input throws the right error", arguments: malformedReplies)
    func malformed(name: String, input: [UInt8], expected: RESPError) {
        #expect(feed(input) == Outcome(error: expected, leftover: input.count), "\(name)")
    }

    @Test("malformed input throws the same error however it is split", arguments: malformedReplies)
    func malformedSplit(name: String, input: [UInt8], expected: RESPError) {
        let whole = Outcome(error: expected, leftover: input.count)
        let cuts = input.count > 1000 ? [0, 1, 2, 500, 65535, 65536, 65537] : Array(0...input.count)
        for cut in cuts {
            #expect(feed(input, cuts: [cut]) == whole, "\(name) cut at \(cut)")
        }
        if input.count <= 1000 {
            #expect(feedByteByByte(input) == whole, "\(name) byte by byte")
        }
    }

    @Test func malformedReplyAfterGoodOnes() {
        let input = bytes("+OK\r\n:1\r\n*2\r\n:1\r\n:x\r\n")
        let expected = Outcome(
            values: [simple("OK"), .integer(1)], error: RESPError(.badInteger, offset: 9), leftover: 12)
        #expect(feed(input) == expected)
        #expect(feedByteByByte(input) == expected)
    }

    @Test func errorsDescribeThemselves() {
        let error = RESPError(.badTypeByte(0x3F), offset: 8)
        #expect(error.description == "RESP: bad type byte 0x3f, expected one of + - : $ * (at byte 8 of the reply)")
        #expect(
            RESPError(.bulkTooLong(length: 100, limit: 10), offset: 1).description
                == "RESP: bulk string of 100 bytes is longer than the limit of 10 (at byte 1 of the reply)")
    }

    // MARK: Limits

    @Test func limitsAreParameters() {
        let small = RESPDecoder(maximumDepth: 2, maximumArrayLength: 3, maximumBulkLength: 4, maximumLineLength: 5)
        let cases: [(String, Outcome)] = [
            ("*1\r\n*1\r\n:1\r\n", Outcome(values: [.array([.array([.integer(1)])])])),
            ("*1\r\n*1\r\n*0\r\n", Outcome(error: RESPError(.tooDeep(limit: 2), offset: 8), leftover: 12)),
            ("*3\r\n:1\r\n:2\r\n:3\r\n", Outcome(values: [.array([.integer(1), .integer(2), .integer(3)])])),
            ("*4\r\n", Outcome(error: RESPError(.arrayTooLong(length: 4, limit: 3), offset: 1), leftover: 4)),
            ("$4\r\nabcd\r\n", Outcome(values: [bulk("abcd")])),
            ("$5\r\n", Outcome(error: RESPError(.bulkTooLong(length: 5, limit: 4), offset: 1), leftover: 4)),
            ("+12345\r\n", Outcome(values: [simple("12345")])),
            ("-123456", Outcome(error: RESPError(.lineTooLong(limit: 5), offset: 6), leftover: 7)),
        ]
        for (input, expected) in cases {
            #expect(feed(bytes(input), decoder: small) == expected, "\(input.debugDescription)")
            #expect(feedByteByByte(bytes(input), decoder: small) == expected, "\(input.debugDescription) byte by byte")
        }
        let zero = RESPDecoder(maximumDepth: 0, maximumArrayLength: 0, maximumBulkLength: 0, maximumLineLength: 0)
        #expect(feed(bytes("+\r\n$0\r\n\r\n:7\r\n"), decoder: zero) == Outcome(values: [simple(""), bulk(""), .integer(7)]))
        #expect(feed(bytes("*0\r\n"), decoder: zero) == Outcome(error: RESPError(.tooDeep(limit: 0), offset: 0), leftover: 4))
    }

    @Test func limitsNearIntMaxDoNotOverflow() {
        let huge = RESPDecoder(
            maximumDepth: .max, maximumArrayLength: .max, maximumBulkLength: .max, maximumLineLength: .max)
        // Declared lengths far beyond the bytes present only mean "wait for more".
        #expect(feed(bytes("$9223372036854775807\r\nabc"), decoder: huge) == Outcome(leftover: 25))
        #expect(feed(bytes("*9223372036854775807\r\n:1\r\n"), decoder: huge) == Outcome(leftover: 26))
        #expect(feed(bytes("+abc"), decoder: huge) == Outcome(leftover: 4))
    }

    @Test func aLargeDeclaredArrayWaitsWithoutBuildingIt() throws {
        // 1M elements declared, 3 present: the decoder waits, keeps the reader index, and later
        // completes once every element is there.
        var decoder = RESPDecoder()
        var buffer = ByteBuffer(string: "*1048576\r\n:1\r\n:2\r\n:3\r\n")
        #expect(try decoder.decode(buffer: &buffer) == nil)
        #expect(buffer.readerIndex == 0)
        for _ in 3..<1_048_576 {
            buffer.writeStaticString(":0\r\n")
        }
        let value = try decoder.decode(buffer: &buffer)
        guard case .array(let elements?) = value else {
            Issue.record("expected an array, got \(String(describing: value))")
            return
        }
        #expect(elements.count == 1_048_576)
        #expect(elements.prefix(4) == [.integer(1), .integer(2), .integer(3), .integer(0)])
        #expect(buffer.readableBytes == 0)
    }

    @Test func aBulkArrivingInManyPiecesIsScannedOnceEach() throws {
        // 4 MiB in 4 KiB pieces: while the payload arrives, each call re-reads only the bulk's
        // header, and the payload is checked once, when complete.
        let payload = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let input = bytes("*2\r\n$\(payload.count)\r\n") + payload + bytes("\r\n+done\r\n")
        let cuts = Array(stride(from: 4096, to: input.count, by: 4096))
        #expect(feed(input, cuts: cuts, compact: true) == Outcome(values: [.array([bulk(payload), simple("done")])]))
    }

    // MARK: No copies

    @Test func bulkPayloadsAreSlicesOfTheReadBuffer() throws {
        // A 1 MiB bulk and the strings of a nested reply: each payload's bytes must lie inside
        // the storage of the buffer they were read from. A decoder that copied them into new
        // storage (an array, a String, a fresh ByteBuffer) would fail this.
        let payload = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0) }
        var input = ByteBuffer()
        RESPValue.array([bulk(payload), .array([simple("OK"), error("ERR e"), bulk("x")])]).encode(into: &input)
        let storage = input.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress!)..<UInt(bitPattern: $0.baseAddress! + $0.count) }

        var decoder = RESPDecoder()
        let value = try #require(try decoder.decode(buffer: &input))
        guard case .array(let top?) = value, case .bulkString(let big?) = top[0], case .array(let inner?) = top[1],
            case .simpleString(let ok) = inner[0], case .error(let err) = inner[1], case .bulkString(let x?) = inner[2]
        else {
            Issue.record("unexpected shape \(value)")
            return
        }
        #expect(big.readableBytes == payload.count)
        for slice in [big, ok, err, x] {
            let range = slice.withUnsafeReadableBytes {
                UInt(bitPattern: $0.baseAddress!)..<UInt(bitPattern: $0.baseAddress! + $0.count)
            }
            #expect(storage.contains(range.lowerBound) && range.upperBound <= storage.upperBound)
        }
        // The payload's bytes are the bytes at its place in the reply (not just any same-size range).
        #expect(big.readableBytesView.elementsEqual(payload))
    }

    @Test func slicesAlsoComeFromAPartiallyReceivedReply() throws {
        // The same check when the reply arrived in pieces (the scan-then-build path).
        let payload = Array(repeating: UInt8(ascii: "z"), count: 100_000)
        let input = bytes("*1\r\n$100000\r\n") + payload + bytes("\r\n")
        var decoder = RESPDecoder()
        var buffer = ByteBuffer()
        buffer.reserveCapacity(input.count)
        buffer.writeBytes(input.prefix(50_000))
        #expect(try decoder.decode(buffer: &buffer) == nil)
        buffer.writeBytes(input.dropFirst(50_000))
        let storage = buffer.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress!) }
        let value = try #require(try decoder.decode(buffer: &buffer))
        guard case .array(let elements?) = value, case .bulkString(let slice?) = elements.first else {
            Issue.record("unexpected shape \(value)")
            return
        }
        let address = slice.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress!) }
        #expect(address == storage + UInt(input.count - payload.count - 2))
    }

    @Test func aWaitingDecoderHoldsNoReferenceToTheBuffer() throws {
        // While a reply is incomplete the decoder must not keep slices of the buffer: then the
        // buffer stays uniquely referenced, and appending the rest does not copy it. Appending to
        // a buffer whose storage is shared (the control case) moves its bytes.
        func baseAddress(_ buffer: ByteBuffer) -> UInt {
            buffer.withVeryUnsafeBytes { UInt(bitPattern: $0.baseAddress!) }
        }
        let input = bytes("*3\r\n$5\r\nhello\r\n+OK\r\n$5\r\nworld\r\n")

        var decoder = RESPDecoder()
        var buffer = ByteBuffer()
        buffer.reserveCapacity(1024)
        buffer.writeBytes(input.prefix(25))  // two elements complete, the third not
        #expect(try decoder.decode(buffer: &buffer) == nil)
        let before = baseAddress(buffer)
        buffer.writeBytes(input.dropFirst(25))
        #expect(baseAddress(buffer) == before, "appending after a nil result copied the buffer")
        #expect(try decoder.decode(buffer: &buffer) == .array([bulk("hello"), simple("OK"), bulk("world")]))

        // Control: a slice held elsewhere does make the append copy, so the check above can fail.
        var control = ByteBuffer()
        control.reserveCapacity(1024)
        control.writeBytes(input.prefix(25))
        let held = control.getSlice(at: 8, length: 5)
        withExtendedLifetime(held) {
            let controlBefore = baseAddress(control)
            control.writeBytes(input.dropFirst(25))
            #expect(baseAddress(control) != controlBefore)
        }
    }

    // MARK: Pipeline stage

    @Test func valueDecoderInASingleStepProcessor() throws {
        let all = wellFormedReplies.flatMap(\.1)
        let processor = NIOSingleStepByteToMessageProcessor(RESPValueDecoder())
        var received: [RESPValue] = []
        var offset = 0
        var size = 1
        while offset < all.count {
            let end = min(all.count, offset + size)
            try processor.process(buffer: ByteBuffer(bytes: all[offset..<end])) { received.append($0) }
            offset = end
            size = size % 97 + 13
        }
        try processor.finishProcessing(seenEOF: true) { received.append($0) }
        #expect(received == wellFormedReplies.map(\.2))
    }

    @Test func valueDecoderReportsAStreamThatEndsInsideAReply() throws {
        let processor = NIOSingleStepByteToMessageProcessor(RESPValueDecoder())
        var received: [RESPValue] = []
        try processor.process(buffer: ByteBuffer(string: "+OK\r\n$5\r\nhel")) { received.append($0) }
        #expect(received == [simple("OK")])
        #expect(throws: ByteToMessageDecoderError.self) {
            try processor.finishProcessing(seenEOF: true) { received.append($0) }
        }
    }

    @Test func valueDecoderPassesRESPErrorsOn() throws {
        let processor = NIOSingleStepByteToMessageProcessor(
            RESPValueDecoder(RESPDecoder(maximumBulkLength: 3)))
        #expect(throws: RESPError(.bulkTooLong(length: 4, limit: 3), offset: 1)) {
            try processor.process(buffer: ByteBuffer(string: "$4\r\nabcd\r\n")) { _ in }
        }
    }

    @Test func descriptionsAreReadable() {
        let value = RESPValue.array([
            simple("OK"), error("ERR x"), .integer(-3), bulk("a\"b\r\n\u{7F}"), .bulkString(nil), .array(nil),
        ])
        #expect(value.description == #"[OK, (error) ERR x, (integer) -3, "a\"b\x0d\x0a\x7f", (nil), (nil)]"#)
        #expect(RESPValue.array(nil).isNull && RESPValue.bulkString(nil).isNull)
        #expect(!RESPValue.array([]).isNull && !bulk("").isNull)
    }
}
