// The relay's pub/sub payload, `<seq>:<epoch>:<line>`: what is accepted (lines
// with ':' and CRLF, the largest seq), that the line is a slice and not a copy,
// and that everything else is refused with a reason and a printable excerpt.

import NIOCore
import RelayCluster
import Testing

@Suite struct RelayMessagePayloadTests {
    private func parse(_ text: String) throws(RelayMessagePayloadError) -> RelayMessagePayload {
        try RelayMessagePayload(parsing: ByteBuffer(string: text))
    }

    @Test func wellFormedPayloads() throws {
        let plain = try parse("42:AbC123xyz789:{\"op\":\"progress\",\"pct\":5}")
        #expect(plain.seq == 42 && plain.epoch == "AbC123xyz789")
        #expect(String(buffer: plain.line) == "{\"op\":\"progress\",\"pct\":5}")

        // Colons and CR LF in the line belong to the line.
        let tricky = try parse("1:e:a:b::c\r\nd\r\n")
        #expect(tricky.seq == 1 && tricky.epoch == "e")
        #expect(String(buffer: tricky.line) == "a:b::c\r\nd\r\n")

        let empty = try parse("7:E:")
        #expect(empty.line.readableBytes == 0)

        #expect(try parse("18446744073709551615:x:l").seq == UInt64.max)
        #expect(try parse("9:\(String(repeating: "z", count: 64)):l").epoch.count == 64)
    }

    @Test func theLineIsASliceOfThePayload() throws {
        var buffer = ByteBuffer(string: "garbage")
        buffer.moveReaderIndex(forwardBy: 7)  // a payload that does not start at the buffer's start
        buffer.writeString("12:ep:line\r\n")
        let payload = try RelayMessagePayload(parsing: buffer)
        #expect(String(buffer: payload.line) == "line\r\n")
        let lineAddress = payload.line.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        let expected = buffer.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) + 6 }
        #expect(lineAddress == expected)
        #expect(String(buffer: buffer) == "12:ep:line\r\n")  // untouched
    }

    @Test(arguments: [
        ("", RelayMessagePayloadError.Reason.missingSeparator),
        ("12", .missingSeparator),
        ("12:epoch", .missingSeparator),
        (":e:l", .badSeq),
        ("-1:e:l", .badSeq),
        ("+1:e:l", .badSeq),
        ("01:e:l", .badSeq),
        ("1a:e:l", .badSeq),
        (" 1:e:l", .badSeq),
        ("0:e:l", .seqOutOfRange),
        ("18446744073709551616:e:l", .seqOutOfRange),
        ("99999999999999999999999:e:l", .seqOutOfRange),
        ("1::l", .badEpoch),
        ("1:e-1:l", .badEpoch),
        ("1:e\r\n:l", .badEpoch),
        ("1:\(String(repeating: "z", count: 65)):l", .badEpoch),
    ])
    func malformedPayloadsAreRefused(text: String, reason: RelayMessagePayloadError.Reason) {
        #expect(throws: RelayMessagePayloadError(reason, payload: ByteBuffer(string: text))) {
            try parse(text)
        }
    }

    @Test func theErrorShowsAPrintableExcerpt() {
        var payload = ByteBuffer(bytes: [0x00, 0xFF] + Array("\r\n:x".utf8))
        payload.writeString(String(repeating: "y", count: 100))
        let error = RelayMessagePayloadError(.badSeq, payload: payload)
        #expect(error.payloadPrefix.hasPrefix("\\x00\\xff\\x0d\\x0a:x"))
        #expect(error.description.contains("seq is not a decimal"))
        #expect(error.description.hasSuffix("... (106 bytes)"))

        let message = RedisChannelMessage(channel: ByteBuffer(string: "c"), payload: ByteBuffer(string: "nope"))
        #expect(throws: RelayMessagePayloadError.self) { try message.relayPayload() }
    }
}
