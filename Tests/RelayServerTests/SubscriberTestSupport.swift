// SubscriberTestSupport: a WebSocket subscriber's whole pipeline in an EmbeddedChannel, against a
// fake hub, fed client bytes the way swift-nio's WebSocketServerEndToEndTests feed theirs.
//
// `SubscriberConnection` builds the pipeline the upgrader builds (NIO's frame decoder, then
// SubscriberPipeline.install), writes hand-built client frames (masked or not, any RSV bits,
// any opcode) and reads back what the relay wrote, parsed into frames.

import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOWebSocket
import RelayAuth
import RelayHub
import Synchronization
import Testing

@testable import RelayServer

/// Records what the subscriber asked of the hub; a test answers through `registry`.
/// `@unchecked Sendable`: used from the test's thread only, which is the embedded loop's.
final class FakeSubscriberHub: SubscriberHub, @unchecked Sendable {
    enum Call: Equatable {
        case subscribe(String, ResumePoint?)
        case release([String])
        case unsubscribe(String, reason: String?)
    }

    let registry: LoopSubscribers
    private(set) var calls: [Call] = []

    init(loop: EmbeddedEventLoop, pingInterval: TimeAmount = .seconds(25)) {
        registry = LoopSubscribers(loopIndex: 0, eventLoop: loop, pingInterval: pingInterval)
    }

    func registry(on loop: any EventLoop) -> LoopSubscribers { registry }

    func subscribe(_ id: SubscriberID, to name: String, resume: ResumePoint?) {
        calls.append(.subscribe(name, resume))
    }

    func unsubscribe(_ id: SubscriberID, from names: [String]) {
        calls.append(.release(names.sorted()))
    }

    func unsubscribe(_ id: SubscriberID, from name: String, reason: String?) {
        calls.append(.unsubscribe(name, reason: reason))
    }
}

/// One frame the relay wrote.
struct ServerFrame: Equatable, CustomStringConvertible {
    var opcode: UInt8
    var payload: [UInt8]

    var text: String { String(decoding: payload, as: UTF8.self) }
    /// The close code of a close frame.
    var closeCode: UInt16? {
        guard opcode == 0x8, payload.count >= 2 else { return nil }
        return UInt16(payload[0]) << 8 | UInt16(payload[1])
    }
    var closeReason: String { String(decoding: payload.dropFirst(2), as: UTF8.self) }
    var description: String {
        opcode == 0x8 ? "close \(closeCode.map(String.init) ?? "-") \(closeReason)" : "op \(opcode) \(text)"
    }
}

/// A client frame's bytes, built by hand so that a test can break any rule.
func clientFrame(
    _ opcode: UInt8, _ payload: [UInt8], fin: Bool = true, rsv: UInt8 = 0, masked: Bool = true,
    mask: [UInt8] = [0x37, 0xFA, 0x21, 0x3D]
) -> [UInt8] {
    var bytes: [UInt8] = [(fin ? 0x80 : 0) | (rsv << 4) | opcode]
    let maskBit: UInt8 = masked ? 0x80 : 0
    switch payload.count {
    case ..<126:
        bytes.append(maskBit | UInt8(payload.count))
    case ..<65536:
        bytes.append(maskBit | 126)
        bytes += [UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
    default:
        bytes.append(maskBit | 127)
        bytes += (0..<8).reversed().map { UInt8((payload.count >> ($0 * 8)) & 0xFF) }
    }
    guard masked else { return bytes + payload }
    bytes += mask
    bytes += payload.enumerated().map { $0.element ^ mask[$0.offset % 4] }
    return bytes
}

func clientText(_ text: String, fin: Bool = true) -> [UInt8] { clientFrame(0x1, Array(text.utf8), fin: fin) }

/// `{"op":"ping","pad":"xx…"}` of exactly `size` bytes: a valid message of any size.
func paddedPing(_ size: Int) -> [UInt8] {
    let head = Array(#"{"op":"ping","pad":""#.utf8)
    let tail = Array(#""}"#.utf8)
    return head + [UInt8](repeating: UInt8(ascii: "x"), count: size - head.count - tail.count) + tail
}

/// `body` as a text message in frames of the given sizes (the last takes the rest).
func fragmented(_ body: [UInt8], sizes: [Int]) -> [UInt8] {
    var out: [UInt8] = []
    var at = 0
    for (index, size) in sizes.enumerated() {
        let last = index == sizes.count - 1
        let chunk = last ? Array(body[at...]) : Array(body[at..<at + size])
        out += clientFrame(index == 0 ? 0x1 : 0x0, chunk, fin: last)
        at += size
    }
    return out
}

/// A subscriber connection in memory: the pipeline after the handshake, over an EmbeddedChannel.
final class SubscriberConnection {
    let channel: EmbeddedChannel
    let hub: FakeSubscriberHub
    /// What `refresh` tokens verify to, by token.
    var refreshVerdicts: [String: Result<Principal, TokenError>] = [:]
    private var pending: [UInt8] = []

    static let pong = #"{"op":"pong","type":"pong"}"#

    init(
        authentication: Result<Principal, TokenError> = .success(SubscriberConnection.principal()),
        topics: [String] = [], maxMessageBytes: Int = 65536, maxOutboundBytes: Int = 1 << 20,
        maxSubscriptions: Int = 100, maxPatternSubscriptions: Int = 8
    ) throws {
        channel = EmbeddedChannel()
        hub = FakeSubscriberHub(loop: channel.embeddedEventLoop)
        let verdicts = VerdictBox()
        let environment = SubscriberEnvironment(
            hub: hub, verify: { token, loop in loop.makeSucceededFuture(verdicts.verdict(token)) },
            metrics: RelayMetrics(),
            maxSubscriptions: maxSubscriptions, maxPatternSubscriptions: maxPatternSubscriptions,
            maxOutboundBytes: maxOutboundBytes, maxMessageBytes: maxMessageBytes,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), pingInterval: .seconds(25))
        self.verdicts = verdicts
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.pipeline.syncOperations.addHandler(
            ByteToMessageHandler(WebSocketFrameDecoder(maxFrameSize: maxMessageBytes)))
        try SubscriberPipeline.install(
            on: channel, environment: environment, authentication: authentication, urlTopics: topics)
    }

    private let verdicts: VerdictBox

    /// A token's principal: grants `task:*` and `watch`, valid for an hour unless told otherwise.
    static func principal(
        subject: String = "alice", grants: [String] = ["task:*", "watch"], validFor seconds: Double? = 3600
    ) -> Principal {
        let until = seconds.map { Date().timeIntervalSince1970 + $0 }
        return Principal(
            subject: subject, grants: GrantSet(grants), expiresAt: until.map { Int64($0) }, validUntil: until)
    }

    func setVerdict(_ token: String, _ verdict: Result<Principal, TokenError>) { verdicts.set(token, verdict) }

    var handler: SubscriberSessionHandler {
        get throws { try channel.pipeline.syncOperations.handler(type: SubscriberSessionHandler.self) }
    }

    /// Writes client bytes as one read.
    func write(_ bytes: [UInt8]) throws {
        try channel.writeInbound(channel.allocator.buffer(bytes: bytes))
    }

    /// Writes client bytes, one read per byte.
    func trickle(_ bytes: [UInt8]) throws {
        for byte in bytes { try write([byte]) }
    }

    /// Every frame the relay wrote since the last call.
    func frames() throws -> [ServerFrame] {
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { pending += buffer.readableBytesView }
        var frames: [ServerFrame] = []
        while let (frame, used) = Self.parse(pending) {
            frames.append(frame)
            pending.removeFirst(used)
        }
        return frames
    }

    /// The close frame the relay wrote, and that nothing followed it.
    func closeCode() throws -> UInt16? {
        let frames = try frames()
        guard let index = frames.firstIndex(where: { $0.opcode == 0x8 }) else { return nil }
        #expect(index == frames.count - 1, "frames after the close frame: \(frames)")
        return frames[index].closeCode
    }

    /// Runs the loop's tasks until `done` holds (at most a second): a token check runs as a Swift
    /// task, off the loop, and completes its future on the loop.
    func settle(until done: () throws -> Bool = { true }) rethrows {
        channel.embeddedEventLoop.run()
        for _ in 0..<500 where try !done() {
            usleep(2000)
            channel.embeddedEventLoop.run()
        }
    }

    private static func parse(_ bytes: [UInt8]) -> (ServerFrame, Int)? {
        guard bytes.count >= 2 else { return nil }
        var length = Int(bytes[1] & 0x7F)
        var at = 2
        if length == 126 {
            guard bytes.count >= 4 else { return nil }
            length = Int(bytes[2]) << 8 | Int(bytes[3])
            at = 4
        } else if length == 127 {
            guard bytes.count >= 10 else { return nil }
            length = bytes[2..<10].reduce(0) { $0 << 8 | Int($1) }
            at = 10
        }
        guard bytes.count >= at + length else { return nil }
        return (ServerFrame(opcode: bytes[0] & 0x0F, payload: Array(bytes[at..<at + length])), at + length)
    }
}

/// The refresh verdicts a test sets; read from the verification task.
final class VerdictBox: Sendable {
    private let verdicts = Mutex([String: Result<Principal, TokenError>]())

    func set(_ token: String, _ verdict: Result<Principal, TokenError>) { verdicts.withLock { $0[token] = verdict } }
    func verdict(_ token: String?) -> Result<Principal, TokenError> {
        verdicts.withLock { all in token.flatMap { all[$0] } } ?? .failure(.badSignature)
    }
}
