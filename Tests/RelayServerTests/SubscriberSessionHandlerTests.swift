// SubscriberSessionHandler and LoopSubscribers in an EmbeddedChannel: the close handshake, the
// token's end and refresh, the heartbeat, replay pacing and the 1013 cut, and fan-out batches
// flushed once each.

import Foundation
import NIOCore
import NIOEmbedded
import RelayAuth
import Testing

@testable import RelayHub
@testable import RelayServer

/// The peer reads nothing: writes stay in the channel (counted by `bufferedWritableBytes`) until
/// `release`; flushes are counted.
final class HeldWrites: ChannelOutboundHandler {
    typealias OutboundIn = ByteBuffer
    private var holding = true
    private(set) var flushes = 0

    func flush(context: ChannelHandlerContext) {
        flushes += 1
        if !holding { context.flush() }
    }

    func release(_ channel: EmbeddedChannel) {
        holding = false
        channel.flush()
    }
}

@Suite struct SubscriberSessionHandlerTests {
    private static func event(_ n: Int, size: Int = 100) -> ByteBuffer {
        let json = #"{"seq":\#(n),"topic":"task:1","pad":""# + String(repeating: "x", count: size) + #""}"#
        return WebSocketText.frame(json)
    }

    private static func plan(_ frames: [ByteBuffer], to id: SubscriberID) -> LoopPlan {
        var plan = LoopPlan()
        for (index, frame) in frames.enumerated() { plan.append(frame, to: [id], continuingRun: index > 0) }
        return plan
    }

    // MARK: Start and close

    @Test func aRefusedTokenGetsItsErrorThen4401() throws {
        let connection = try SubscriberConnection(authentication: .failure(.expired), topics: ["task:1"])
        let frames = try connection.frames()
        #expect(frames.map(\.opcode) == [0x1, 0x8])
        #expect(frames.first?.text.contains(#""code":"unauthorized""#) == true)
        #expect(frames.last?.closeCode == 4401)
        #expect(connection.hub.calls == [])
    }

    @Test func aURLTopicNotGrantedGetsForbiddenThen4403() throws {
        let connection = try SubscriberConnection(topics: ["task:1", "secret"])
        let frames = try connection.frames()
        #expect(
            frames.first?.text == #"{"op":"error","code":"forbidden","message":"topic not granted","topic":"secret"}"#)
        #expect(frames.last?.closeCode == 4403)
    }

    @Test func aClientCloseIsEchoedAndTheConnectionReleasesItsSubscriptions() throws {
        let connection = try SubscriberConnection(topics: ["task:1", "task:2"])
        #expect(connection.hub.calls == [.subscribe("task:1", nil), .subscribe("task:2", nil)])
        try connection.write(clientFrame(0x8, [0x03, 0xE9]))
        #expect(try connection.closeCode() == 1001)
        try connection.settle()
        #expect(!connection.channel.isActive)
        #expect(connection.hub.calls.last == .release(["task:1", "task:2"]))
    }

    @Test func shutdownClosesWith1001BehindTheEventsAlreadyQueued() throws {
        let connection = try SubscriberConnection(topics: ["task:1"])
        let handler = try connection.handler
        handler.deliver([Self.event(1)], 0..<1)
        handler.close(.goingAway)
        handler.deliver([Self.event(2)], 0..<1)  // after the close frame: not written
        let frames = try connection.frames()
        #expect(frames.count == 2)
        #expect(frames.first?.text.hasPrefix(#"{"seq":1,"#) == true)
        #expect(frames.last?.closeCode == 1001)
    }

    @Test func aCloseWhoseFrameIsNotWrittenEndsTheConnectionAfterTwoSeconds() throws {
        let connection = try SubscriberConnection()
        let held = HeldWrites()
        try connection.channel.pipeline.syncOperations.addHandler(held, position: .first)
        try connection.write(clientFrame(0x8, []))
        connection.channel.embeddedEventLoop.advanceTime(by: .milliseconds(1999))
        #expect(connection.channel.isActive)
        connection.channel.embeddedEventLoop.advanceTime(by: .milliseconds(1))
        #expect(!connection.channel.isActive)
    }

    // MARK: Token end, refresh, heartbeat (through the handler, on the real clock)

    @Test func aTokenThatEndsWhileConnectedGetsUnauthorizedThen4401() throws {
        let connection = try SubscriberConnection(
            authentication: .success(SubscriberConnection.principal(validFor: 30)))
        let handler = try connection.handler
        handler.tick(now: .now() + .seconds(20), sendPing: false, deadAfter: .seconds(50))
        #expect(try connection.frames() == [])
        handler.tick(now: .now() + .seconds(31), sendPing: false, deadAfter: .seconds(50))
        let frames = try connection.frames()
        #expect(frames.first?.text == #"{"op":"error","code":"unauthorized","message":"token expired"}"#)
        #expect(frames.last?.closeCode == 4401)
    }

    @Test func aRefreshIsVerifiedAndAnsweredAndMovesTheEnd() throws {
        let connection = try SubscriberConnection(
            authentication: .success(SubscriberConnection.principal(validFor: 30)))
        let fresh = SubscriberConnection.principal(validFor: 3600)
        connection.setVerdict("t2", .success(fresh))
        try connection.write(clientText(#"{"op":"refresh","token":"t2"}"#))
        var frames: [ServerFrame] = []
        try connection.settle {
            frames += try connection.frames()
            return !frames.isEmpty
        }
        #expect(frames.map(\.text) == [#"{"op":"refreshed","exp":\#(fresh.expiresAt!)}"#])
        try connection.handler.tick(now: .now() + .seconds(60), sendPing: false, deadAfter: .seconds(50))
        #expect(try connection.frames() == [])
    }

    @Test func aBadRefreshTokenIs4401() throws {
        let connection = try SubscriberConnection()
        try connection.write(clientText(#"{"op":"refresh","token":"forged"}"#))
        var frames: [ServerFrame] = []
        try connection.settle {
            frames += try connection.frames()
            return frames.contains { $0.opcode == 0x8 }
        }
        #expect(frames.map(\.opcode) == [0x1, 0x8])
        #expect(frames.last?.closeCode == 4401)
    }

    @Test func aClientHeardFromIsPingedAndOneThatIsNotIsDroppedWithoutACloseFrame() throws {
        let connection = try SubscriberConnection()
        let handler = try connection.handler
        handler.tick(now: .now() + .seconds(25), sendPing: true, deadAfter: .seconds(50))
        #expect(try connection.frames() == [ServerFrame(opcode: 0x9, payload: [])])
        // A frame trickled a byte at a time is heard only once whole.
        let pong = clientFrame(0xA, [])
        try connection.trickle(Array(pong.dropLast()))
        handler.tick(now: .now() + .seconds(51), sendPing: true, deadAfter: .seconds(50))
        #expect(try connection.frames() == [])
        #expect(!connection.channel.isActive)
    }

    // MARK: Replay pacing and the 1013 cut

    @Test func aReplayBeyondTheBoundIsNotCutButLiveEventsOverItAre() throws {
        let connection = try SubscriberConnection(topics: ["task:1"], maxOutboundBytes: 1000)
        let held = HeldWrites()
        try connection.channel.pipeline.syncOperations.addHandler(held, position: .first)
        connection.channel.isWritable = false
        connection.channel.pipeline.fireChannelWritabilityChanged()
        let handler = try connection.handler
        let id = handler.id
        // 20 replayed events of ~150 bytes: three times the bound, written at once.
        let replay = (1...20).map { Self.event($0) }
        connection.hub.registry.subscribed(
            id, to: "task:1", Subscription(epoch: "e", seq: 20, recovered: true, frames: replay))
        handler.flushDelivered()
        #expect(handler.closing == false)
        // Live events up to the bound are owed; one more and the connection is cut.
        handler.deliver((21...26).map { Self.event($0) }, 0..<6)
        handler.flushDelivered()
        #expect(handler.closing == false)
        handler.deliver([Self.event(27)], 0..<1)
        handler.flushDelivered()
        #expect(handler.closing == true)
        held.release(connection.channel)
        let frames = try connection.frames()
        #expect(frames.first?.text.hasPrefix(#"{"op":"subscribed","topic":"task:1""#) == true)
        #expect(
            frames.dropFirst().prefix(27).map { $0.text.hasPrefix(#"{"seq":"#) } == Array(repeating: true, count: 27))
        #expect(frames.last?.closeCode == 1013)
        #expect(frames.count == 29)
    }

    @Test func aClientThatNeverReadsItsAnswersIs1013() throws {
        let connection = try SubscriberConnection(maxOutboundBytes: 1000)
        let held = HeldWrites()
        try connection.channel.pipeline.syncOperations.addHandler(held, position: .first)
        connection.channel.isWritable = false
        connection.channel.pipeline.fireChannelWritabilityChanged()
        // Each answer is 29 bytes: the 35th puts 1015 bytes in the channel.
        for _ in 0..<34 { try connection.write(clientText("ping")) }
        #expect(try connection.handler.closing == false)
        try connection.write(clientText("ping"))
        #expect(try connection.handler.closing == true)
        held.release(connection.channel)
        #expect(try connection.closeCode() == 1013)
    }

    // MARK: LoopSubscribers

    @Test func aBatchIsWrittenAtOnceAndFlushedOncePerTurnOfTheLoop() throws {
        let connection = try SubscriberConnection(topics: ["task:1"])
        let counter = HeldWrites()
        try connection.channel.pipeline.syncOperations.addHandler(counter, position: .first)
        counter.release(connection.channel)
        let flushesBefore = counter.flushes
        let id = try connection.handler.id
        let done = DoneCounter()
        connection.hub.registry.deliver(Self.plan([Self.event(1), Self.event(2)], to: id)) { done.tick() }
        connection.hub.registry.deliver(Self.plan([Self.event(3)], to: id)) { done.tick() }
        #expect(counter.flushes == flushesBefore)
        #expect(done.count == 0)
        connection.channel.embeddedEventLoop.run()
        #expect(counter.flushes == flushesBefore + 1)
        #expect(done.count == 2)
        #expect(try connection.frames().map { $0.text.prefix(9) } == [#"{"seq":1,"#, #"{"seq":2,"#, #"{"seq":3,"#])
        // The next batch is flushed again: the registry cleared its mark.
        connection.hub.registry.deliver(Self.plan([Self.event(4)], to: id)) { done.tick() }
        connection.channel.embeddedEventLoop.run()
        #expect(counter.flushes == flushesBefore + 2)
        #expect(try connection.frames().count == 1)
    }
}

final class DoneCounter: @unchecked Sendable {
    // @unchecked: ticked on the embedded loop, which is the test's own thread.
    private(set) var count = 0
    func tick() { count += 1 }
}
