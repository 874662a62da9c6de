// ControlFrameTests: the relay's own frames to a subscriber, read back as a client reads them
// (RFC 6455 section 5.2: unmasked server frames) and checked against docs/protocol.md.

import Foundation
import NIOCore
import Testing

@testable import RelayHub
@testable import RelayServer

/// One unmasked server frame, taken apart.
private struct SentControlFrame {
    var fin: Bool
    var rsv: UInt8
    var opcode: UInt8
    var payload: [UInt8]

    init(_ buffer: ByteBuffer) throws {
        var buffer = buffer
        let header = buffer.readBytes(length: 2) ?? []
        try #require(header.count == 2)
        fin = header[0] & 0x80 != 0
        rsv = header[0] & 0x70
        opcode = header[0] & 0x0F
        #expect(header[1] & 0x80 == 0, "a server frame is never masked")
        var length = Int(header[1] & 0x7F)
        if length == 126 {
            let extended = buffer.readInteger(as: UInt16.self)
            length = Int(try #require(extended))
            #expect(length >= 126, "the shortest length form")
        } else if length == 127 {
            let extended = buffer.readInteger(as: UInt64.self)
            length = Int(try #require(extended))
            #expect(length > 0xFFFF, "the shortest length form")
        }
        let bytes = buffer.readBytes(length: length)
        payload = try #require(bytes)
        #expect(buffer.readableBytes == 0, "one frame, nothing after it")
    }

    var text: String { String(decoding: payload, as: UTF8.self) }

    func json() throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(payload)) as? [String: Any])
    }
}

@Suite struct ControlFrameTests {
    @Test func unsubscribedWithAndWithoutReason() throws {
        let plain = try SentControlFrame(ControlFrame.unsubscribed(topic: "task:1"))
        #expect(plain.fin && plain.rsv == 0 && plain.opcode == 0x1)
        #expect(plain.text == #"{"op":"unsubscribed","topic":"task:1"}"#)
        let forbidden = try SentControlFrame(ControlFrame.unsubscribed(topic: "task:1", reason: "forbidden"))
        #expect(forbidden.text == #"{"op":"unsubscribed","topic":"task:1","reason":"forbidden"}"#)
    }

    @Test(arguments: [
        (ErrorCode.unauthorized, "unauthorized"), (.forbidden, "forbidden"), (.badRequest, "bad_request"),
        (.unknownOp, "unknown_op"), (.tooManySubscriptions, "too_many_subscriptions"),
    ])
    func errorCarriesTheContractsCode(code: ErrorCode, wire: String) throws {
        let frame = try SentControlFrame(ControlFrame.error(code, "m"))
        #expect(frame.text == "{\"op\":\"error\",\"code\":\"\(wire)\",\"message\":\"m\"}")
    }

    @Test func errorMessageAndTopicAreJSONStrings() throws {
        let message = "a \"quote\", a \\ backslash,\na newline, a \u{1} control and é"
        let frame = try SentControlFrame(ControlFrame.error(.badRequest, message, topic: "t\"1"))
        let object = try frame.json()
        #expect(object["op"] as? String == "error")
        #expect(object["message"] as? String == message)
        #expect(object["topic"] as? String == "t\"1")
    }

    @Test func pongAndRefreshed() throws {
        #expect(try SentControlFrame(ControlFrame.pong).text == #"{"op":"pong","type":"pong"}"#)
        #expect(try SentControlFrame(ControlFrame.refreshed(exp: 1_700_000_000)).text == #"{"op":"refreshed","exp":1700000000}"#)
        #expect(try SentControlFrame(ControlFrame.refreshed(exp: nil)).text == #"{"op":"refreshed","exp":null}"#)
    }

    @Test func subscribedNamesEpochSeqAndRecovered() throws {
        let subscription = Subscription(epoch: "ab12cd34-1", seq: 17, recovered: true, frames: [])
        let first = try SentControlFrame(ControlFrame.subscribed(topic: "task:1", subscription: subscription, pingInterval: "25"))
        let object = try first.json()
        #expect(object["op"] as? String == "subscribed")
        #expect(object["topic"] as? String == "task:1")
        #expect(object["epoch"] as? String == "ab12cd34-1")
        #expect(object["seq"] as? Int == 17)
        #expect(object["recovered"] as? Bool == true)
        #expect(object["ping_interval"] as? Int == 25)
        let later = try SentControlFrame(ControlFrame.subscribed(topic: "task:1", subscription: subscription))
        #expect(try later.json()["ping_interval"] == nil)
    }

    @Test(arguments: [
        (TimeAmount.seconds(25), "25"), (.milliseconds(500), "0.5"), (.milliseconds(1500), "1.5"), (.seconds(1), "1"),
    ])
    func pingIntervalIsAJSONNumberOfSeconds(amount: TimeAmount, text: String) {
        #expect(ControlFrame.seconds(amount) == text)
    }

    @Test func pingIsAnEmptyPingFrame() throws {
        let frame = try SentControlFrame(ControlFrame.ping)
        #expect(frame.fin && frame.opcode == 0x9 && frame.payload.isEmpty)
    }

    @Test func pongCarriesThePingsPayload() throws {
        let payload = ByteBuffer(bytes: Array(0..<125))
        let frame = try SentControlFrame(ControlFrame.pong(payload: payload))
        #expect(frame.fin && frame.opcode == 0xA)
        #expect(frame.payload == Array(0..<125))
    }

    @Test(arguments: [
        CloseCode.normal, .goingAway, .protocolError, .unsupportedData, .invalidPayload, .policyViolation,
        .messageTooBig, .tryAgainLater, .unauthorized, .forbidden,
    ])
    func closeCarriesItsCodeAndReason(code: CloseCode) throws {
        let frame = try SentControlFrame(ControlFrame.close(code, reason: "why"))
        #expect(frame.fin && frame.opcode == 0x8)
        #expect(frame.payload.count == 5)
        #expect(UInt16(frame.payload[0]) << 8 | UInt16(frame.payload[1]) == code.rawValue)
        #expect(Array(frame.payload[2...]) == Array("why".utf8))
        // RFC 6455 section 7.4.1: never the codes reserved for endpoints' own use.
        #expect(![1004, 1005, 1006, 1015].contains(code.rawValue))
    }

    @Test func aLongCloseReasonIsCutToFitAControlFrame() throws {
        let ascii = try SentControlFrame(ControlFrame.close(.protocolError, reason: String(repeating: "r", count: 300)))
        #expect(ascii.payload.count == 125)
        // 62 two-byte characters: 124 bytes, cut before the one that would straddle byte 123.
        let accented = try SentControlFrame(ControlFrame.close(.protocolError, reason: String(repeating: "é", count: 62)))
        #expect(accented.payload.count == 2 + 122)
        #expect(String(validating: accented.payload[2...], as: UTF8.self) == String(repeating: "é", count: 61))
    }
}
