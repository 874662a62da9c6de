// IngestHarness: an ingest handler in an EmbeddedChannel against a fake hub, and the reference
// it is checked against (the whole input split on `\n`, each line judged on its own).

import Logging
import NIOCore
import NIOEmbedded
import RelayHub
import Synchronization

@_spi(Fuzzing) @testable import RelayServer

/// Stands in for `HubDriver.publish`: records every batch and, while holding, keeps each batch's
/// `done` (so its bytes stay taken from the budget) until `release`.
final class FakeHub: Sendable {
    struct Published: Equatable, CustomStringConvertible {
        var topic: String
        var object: [UInt8]
        var description: String { "\(topic): \(String(decoding: object, as: UTF8.self))" }
    }

    private struct State {
        var batches: [[Published]] = []
        var holding = false
        var held: [@Sendable () -> Void] = []
        var pause: EventLoopFuture<Void>?
    }

    private let state = Mutex(State())

    var batches: [[Published]] { state.withLock { $0.batches } }
    var published: [Published] { batches.flatMap { $0 } }
    var heldCount: Int { state.withLock { $0.held.count } }

    /// Keeps the `done` of the batches published from now on.
    func hold() { state.withLock { $0.holding = true } }

    /// Runs every kept `done` and stops holding.
    func release() {
        let held = state.withLock { state in
            state.holding = false
            defer { state.held = [] }
            return state.held
        }
        for done in held { done() }
    }

    /// The next batch answers with this pause (cluster mode's full Redis queue).
    func pauseNext(until future: EventLoopFuture<Void>) { state.withLock { $0.pause = future } }

    var publish: IngestPublish {
        { [self] events, _, done in
            let batch = events.map { Published(topic: $0.topic, object: Array($0.object.readableBytesView)) }
            let (callNow, pause) = state.withLock { state -> (Bool, EventLoopFuture<Void>?) in
                state.batches.append(batch)
                defer { state.pause = nil }
                if state.holding {
                    state.held.append(done)
                    return (false, state.pause)
                }
                return (true, state.pause)
            }
            if callNow { done() }
            return pause
        }
    }
}

/// Counts the reads the ingest handler passes on towards the socket.
final class ReadCounter: ChannelOutboundHandler {
    typealias OutboundIn = Any
    private(set) var reads = 0

    func read(context: ChannelHandlerContext) {
        reads += 1
        context.read()
    }
}

/// One emitter connection in memory.
struct IngestConnection {
    let channel: EmbeddedChannel
    let hub: FakeHub
    let handler: IngestHandler
    let counter: ReadCounter
    let budget: NIOLoopBound<IngestBudget>
    let emitters: EmitterLimits

    init(
        maxEventBytes: Int = 1024, budgetBytes: Int = 1 << 40, grants: GrantSet? = nil, uid: UInt32 = 1000,
        hub: FakeHub = FakeHub(), emitters: EmitterLimits = EmitterLimits(settings: EmitterLimitSettings()),
        loop: EmbeddedEventLoop = EmbeddedEventLoop(), budget: NIOLoopBound<IngestBudget>? = nil
    ) throws {
        let budget = budget ?? NIOLoopBound(IngestBudget(limit: budgetBytes), eventLoop: loop)
        let environment = IngestEnvironment(
            publish: hub.publish, metrics: RelayMetrics(), maxEventBytes: maxEventBytes,
            logger: .init(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), budget: budget,
            emitters: emitters)
        handler = IngestHandler(environment: environment, peer: PeerCredentials(pid: 1, uid: uid, grants: grants))
        counter = ReadCounter()
        channel = EmbeddedChannel(loop: loop)
        try channel.pipeline.syncOperations.addHandlers([counter, handler])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        self.hub = hub
        self.budget = budget
        self.emitters = emitters
    }

    /// One read of `bytes`, as NIO delivers it: `channelRead` then `channelReadComplete`.
    func read(_ bytes: some Collection<UInt8>) throws {
        try channel.writeInbound(channel.allocator.buffer(bytes: bytes))
    }

    /// Everything written back to the emitter so far.
    func answers() throws -> String {
        var text = ""
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) {
            text += String(decoding: buffer.readableBytesView, as: UTF8.self)
        }
        return text
    }

    /// The emitter's end-of-file (or a drain's `shutdown(SHUT_RD)`).
    func endOfInput() {
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
    }
}

/// What the relay must do with a whole stream: split on `\n`, a trailing `\r` dropped, each
/// complete line judged on its own; the unfinished tail is never published, and is answered
/// `line_too_long` only once it is longer than the limit plus a `\r`.
enum IngestReference {
    struct Outcome: Equatable {
        var published: [FakeHub.Published]
        var answers: String
    }

    static func outcome(of stream: [UInt8], maxEventBytes: Int, grants: GrantSet? = nil) -> Outcome {
        var published: [FakeHub.Published] = []
        var answers = ""
        var pieces = stream.split(separator: 0x0A, omittingEmptySubsequences: false)
        let tail = pieces.removeLast()
        for (index, piece) in pieces.enumerated() {
            let number = index + 1
            var line = Array(piece)
            if line.last == 0x0D { line.removeLast() }
            guard line.count <= maxEventBytes else {
                answers += answer(.tooLong, number)
                continue
            }
            switch IngestLineParser.parse(line) {
            case .success(let parsed):
                if let grants, !grants.covers(parsed.topic) {
                    answers += answer(.forbiddenTopic, number)
                } else {
                    published.append(.init(topic: parsed.topic, object: Array(line[parsed.objectStart..<parsed.objectEnd])))
                }
            case .failure(let error):
                if !line.allSatisfy({ $0 == 0x20 || $0 == 0x09 }) { answers += answer(error, number) }
            }
        }
        if tail.count > maxEventBytes + 1 { answers += answer(.tooLong, pieces.count + 1) }
        return Outcome(published: published, answers: answers)
    }

    static func answer(_ reason: IngestLineError, _ line: Int) -> String {
        "{\"error\":\"\(reason.rawValue)\",\"line\":\(line)}\n"
    }
}
