// The RFC 6455 rules a subscriber's frames must keep (docs/protocol.md, section 4, "Bad client
// frames", "Fragments", "Close frames", "Pings"), fed as raw bytes into the whole pipeline after
// the handshake: NIO's decoder, WebSocketFrameCheck, NIO's aggregator, WebSocketMessageCheck and
// the session. Each case the end-to-end suite checks through a process, and the ones it cannot
// afford: a frame cut at every byte, a message in every split.

import NIOCore
import Testing

@testable import RelayServer

@Suite struct SubscriberProtocolTests {
    private static let ping = Array(#"{"op":"ping"}"#.utf8)

    /// The close code a connection answers `bytes` with, checking that nothing followed it.
    private func closeCode(after bytes: [UInt8]) throws -> UInt16? {
        let connection = try SubscriberConnection()
        try connection.write(bytes)
        return try connection.closeCode()
    }

    // MARK: 1002

    @Test func anUnmaskedFrameIs1002() throws {
        #expect(try closeCode(after: clientFrame(0x1, Self.ping, masked: false)) == 1002)
    }

    @Test(arguments: [UInt8(4), 2, 1]) func aReservedBitIs1002(rsv: UInt8) throws {
        #expect(try closeCode(after: clientFrame(0x1, Self.ping, rsv: rsv)) == 1002)
    }

    @Test func aReservedBitOnAContinuationIs1002() throws {
        let bytes =
            clientFrame(0x1, Array(paddedPing(40)[..<20]), fin: false)
            + clientFrame(0x0, Array(paddedPing(40)[20...]), rsv: 4)
        #expect(try closeCode(after: bytes) == 1002)
    }

    @Test func anUnmaskedContinuationIs1002() throws {
        let body = paddedPing(40)
        let bytes =
            clientFrame(0x1, Array(body[..<20]), fin: false) + clientFrame(0x0, Array(body[20...]), masked: false)
        #expect(try closeCode(after: bytes) == 1002)
    }

    @Test(arguments: [UInt8(0x3), 0x7, 0xB, 0xF]) func aReservedOpcodeIs1002(opcode: UInt8) throws {
        #expect(try closeCode(after: clientFrame(opcode, Array("x".utf8))) == 1002)
    }

    @Test(arguments: [UInt8(0x9), 0xA]) func aControlFrameOf126BytesIs1002(opcode: UInt8) throws {
        #expect(try closeCode(after: clientFrame(opcode, [UInt8](repeating: 0x70, count: 126))) == 1002)
    }

    @Test func aControlFrameOf125BytesIsAnswered() throws {
        let connection = try SubscriberConnection()
        let payload = [UInt8](repeating: 0x70, count: 125)
        try connection.write(clientFrame(0x9, payload))
        #expect(try connection.frames() == [ServerFrame(opcode: 0xA, payload: payload)])
    }

    @Test func aFragmentedPingIs1002() throws {
        #expect(try closeCode(after: clientFrame(0x9, Array("abc".utf8), fin: false)) == 1002)
    }

    @Test func aContinuationWithoutAStartIs1002() throws {
        #expect(try closeCode(after: clientFrame(0x0, Self.ping)) == 1002)
    }

    @Test(arguments: [true, false]) func aNewMessageInsideAFragmentedOneIs1002(newIsFinal: Bool) throws {
        let bytes =
            clientFrame(0x1, Array(#"{"op":"ping","pad":"#.utf8), fin: false)
            + clientFrame(0x1, Array(#""xx"}xxxxxxxxxxxxxxxx"#.utf8), fin: newIsFinal)
        #expect(try closeCode(after: bytes) == 1002)
    }

    // MARK: Fragments: at most 128 frames, non-final ones of 16 bytes or more

    @Test func thousandsOfOneByteFragmentsAre1002() throws {
        let body = paddedPing(3000)
        #expect(try closeCode(after: fragmented(body, sizes: [Int](repeating: 1, count: 3000))) == 1002)
    }

    @Test(arguments: [[15, 20, 5], [20, 15, 5]]) func aNonFinalFragmentUnder16BytesIs1002(sizes: [Int]) throws {
        #expect(try closeCode(after: fragmented(paddedPing(60), sizes: sizes)) == 1002)
    }

    @Test func sixteenByteFragmentsAndAOneByteFinalAreAccepted() throws {
        let connection = try SubscriberConnection()
        try connection.write(fragmented(paddedPing(16 * 3 + 1), sizes: [16, 16, 16, 1]))
        #expect(try connection.frames().map(\.text) == [SubscriberConnection.pong])
    }

    @Test func aZeroByteFinalFragmentIsAccepted() throws {
        let connection = try SubscriberConnection()
        let body = paddedPing(32)
        try connection.write(clientFrame(0x1, body, fin: false) + clientFrame(0x0, []))
        #expect(try connection.frames().map(\.text) == [SubscriberConnection.pong])
    }

    @Test func oneHundredAndTwentyEightFragmentsAreAcceptedAndOneMoreIs1002() throws {
        let connection = try SubscriberConnection()
        try connection.write(fragmented(paddedPing(16 * 128), sizes: [Int](repeating: 16, count: 128)))
        #expect(try connection.frames().map(\.text) == [SubscriberConnection.pong])
        try connection.write(fragmented(paddedPing(16 * 129), sizes: [Int](repeating: 16, count: 129)))
        #expect(try connection.closeCode() == 1002)
    }

    @Test func aPingBetweenFragmentsIsAnsweredAndTheMessageStillAssembled() throws {
        let connection = try SubscriberConnection()
        let body = paddedPing(40)
        try connection.write(clientFrame(0x1, Array(body[..<20]), fin: false))
        try connection.write(clientFrame(0x9, Array("hi".utf8)))
        try connection.write(clientFrame(0x0, Array(body[20...])))
        #expect(
            try connection.frames() == [
                ServerFrame(opcode: 0xA, payload: Array("hi".utf8)),
                ServerFrame(opcode: 0x1, payload: Array(SubscriberConnection.pong.utf8)),
            ])
    }

    @Test func aCloseBetweenFragmentsIsEchoed() throws {
        let bytes = clientFrame(0x1, Array(paddedPing(40)[..<20]), fin: false) + clientFrame(0x8, [0x03, 0xE8])
        #expect(try closeCode(after: bytes) == 1000)
    }

    // MARK: 1003, 1007, 1009

    @Test func aBinaryMessageIs1003() throws {
        #expect(try closeCode(after: clientFrame(0x2, Self.ping)) == 1003)
    }

    @Test func aFragmentedBinaryMessageWithAShortFirstFragmentIs1003() throws {
        // 6 bytes would be a too-short fragment (1002) if it reached the aggregator.
        let bytes = clientFrame(0x2, Array(#"{"op":"#.utf8), fin: false) + clientFrame(0x0, Array(#""ping"}"#.utf8))
        #expect(try closeCode(after: bytes) == 1003)
    }

    @Test func aBinaryFrameInsideATextMessageIs1003() throws {
        let bytes = clientFrame(0x1, Array(paddedPing(40)[..<20]), fin: false) + clientFrame(0x2, Self.ping)
        #expect(try closeCode(after: bytes) == 1003)
    }

    @Test(arguments: [
        Array(#"{"op":"ping","x":""#.utf8) + [0xFF] + Array(#""}"#.utf8),
        Array(#"{"op":"ping","x":""#.utf8) + [0xC0, 0xAF] + Array(#""}"#.utf8),
        Array(#"{"op":"ping","x":""#.utf8) + [0xED, 0xA0, 0x80] + Array(#""}"#.utf8),
        Array(#"{"op":"ping"}"#.utf8) + [0xE2, 0x82],
        [0x80],
    ])
    func invalidUTF8Is1007(payload: [UInt8]) throws {
        #expect(try closeCode(after: clientFrame(0x1, payload)) == 1007)
    }

    @Test func invalidUTF8InALaterFragmentIs1007() throws {
        let bytes =
            clientFrame(0x1, Array(#"{"op":"ping","pad":"xx","#.utf8), fin: false)
            + clientFrame(0x0, Array(#""x":""#.utf8) + [0xFF] + Array(#""}"#.utf8))
        #expect(try closeCode(after: bytes) == 1007)
    }

    @Test func aCharacterSplitAcrossFragmentsIsFine() throws {
        let connection = try SubscriberConnection()
        let body = Array(#"{"op":"ping","pad":"€€€€€€"}"#.utf8)
        // Splits inside the first euro sign (E2 82 AC), after the 16-byte minimum.
        let cut = body.firstIndex(of: 0xE2)! + 1
        try connection.write(clientFrame(0x1, Array(body[..<cut]), fin: false) + clientFrame(0x0, Array(body[cut...])))
        #expect(try connection.frames().map(\.text) == [SubscriberConnection.pong])
    }

    @Test(arguments: [65537, 100_000]) func aMessageOverTheLimitIs1009(size: Int) throws {
        #expect(try closeCode(after: clientFrame(0x1, paddedPing(size))) == 1009)
    }

    @Test func fragmentsSummingOverTheLimitAre1009() throws {
        #expect(try closeCode(after: fragmented(paddedPing(80_000), sizes: [40_000, 40_000])) == 1009)
    }

    @Test func manySmallFragmentsSummingOverTheLimitAre1009() throws {
        let sizes = [Int](repeating: 7000, count: 10)
        #expect(try closeCode(after: fragmented(paddedPing(70_000), sizes: sizes)) == 1009)
    }

    @Test(arguments: [[65536], [30_000, 30_000, 5536]]) func aMessageOfExactlyTheLimitIsAccepted(sizes: [Int]) throws {
        let connection = try SubscriberConnection()
        try connection.write(fragmented(paddedPing(65536), sizes: sizes))
        #expect(try connection.frames().map(\.text) == [SubscriberConnection.pong])
    }

    // MARK: Close frames

    /// Close bodies and the code each is answered with.
    static let closes: [([UInt8], UInt16)] = [
        ([], 1000),
        ([0x03, 0xE8], 1000),  // 1000
        ([0x03, 0xE9], 1001),  // 1001 is echoed
        ([0x0B, 0xB8], 1000),  // 3000
        ([0x0F, 0xA0] + Array("bye".utf8), 1000),  // 4000 with a reason
        ([0x03], 1002),  // a 1-byte body
        ([0x03, 0xE7], 1002),  // 999
        ([0x03, 0xEC], 1002),  // 1004
        ([0x03, 0xED], 1002),  // 1005
        ([0x03, 0xEE], 1002),  // 1006
        ([0x03, 0xF7], 1002),  // 1015
        ([0x03, 0xF8], 1002),  // 1016
        ([0x13, 0x88], 1002),  // 5000
        ([0x03, 0xE8, 0x62, 0xFF], 1007),  // a reason that is not UTF-8
        ([0x03, 0xE8, 0xED, 0xA0, 0x80], 1007),  // a surrogate
    ]

    @Test(arguments: closes)
    func aClientCloseIsAnsweredOnce(body: [UInt8], answer: UInt16) throws {
        let connection = try SubscriberConnection()
        // A ping in the same read as the close gets no pong: nothing follows the close frame.
        try connection.write(clientFrame(0x9, []) + clientFrame(0x8, body) + clientText("ping"))
        #expect(try connection.closeCode() == answer)
    }

    @Test func nothingIsReadAfterAViolation() throws {
        let connection = try SubscriberConnection()
        try connection.write(clientFrame(0x1, Self.ping, masked: false) + clientText("ping") + clientFrame(0x8, []))
        #expect(try connection.frames().compactMap(\.closeCode) == [1002])
    }

    // MARK: Pings, and frames cut anywhere

    @Test func aPingFloodInOneReadGetsOnePongWithTheNewestPayload() throws {
        let connection = try SubscriberConnection()
        let pings = (0..<50).flatMap { clientFrame(0x9, Array("p\($0)".utf8)) }
        try connection.write(pings)
        #expect(try connection.frames() == [ServerFrame(opcode: 0xA, payload: Array("p49".utf8))])
    }

    @Test func aMessageCutAtEveryByteIsTheSameMessage() throws {
        let connection = try SubscriberConnection()
        let body = paddedPing(60)
        let message =
            clientFrame(0x1, Array(body[..<20]), fin: false) + clientFrame(0x9, [7])
            + clientFrame(0x0, Array(body[20...]))
        try connection.trickle(message)
        #expect(
            try connection.frames() == [
                ServerFrame(opcode: 0xA, payload: [7]),
                ServerFrame(opcode: 0x1, payload: Array(SubscriberConnection.pong.utf8)),
            ])
    }

    @Test func everySplitOfTwoMessagesGivesTwoAnswers() throws {
        let stream = clientText("ping") + fragmented(paddedPing(50), sizes: [16, 16, 18])
        for cut in 0...stream.count {
            let connection = try SubscriberConnection()
            try connection.write(Array(stream[..<cut]))
            try connection.write(Array(stream[cut...]))
            #expect(
                try connection.frames().map(\.text) == [SubscriberConnection.pong, SubscriberConnection.pong],
                "cut at \(cut)")
        }
    }
}
