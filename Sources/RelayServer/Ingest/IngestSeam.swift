// IngestSeam: where the ingest side touches the hub, and how a test or a fuzzer builds an
// ingest handler without a relay around it.
//
// The handler hands each read's good lines to an `IngestPublish` closure: `HubDriver.publish`
// in the relay, a fake hub that records batches (and holds or releases the budget) in the
// in-memory tests and in the fuzz harness. A closure rather than a protocol or a generic
// parameter: it is called once per batch (never per line), so its indirect call costs nothing
// measurable; the handler stays a plain, non-generic class; and the relay has one publisher, so
// a protocol would have one conformer and a fake.

import Logging
import NIOCore
import RelayHub

/// Publishes one batch of ingest lines (the good lines of one read, in order).
///
/// `done` must run (on any thread) once the batch no longer needs the ingest budget: in the relay,
/// once every subscriber loop has written it. A non-nil result is a pause: the budget counts as
/// spent, and no emitter connection is read, until that future completes (cluster mode, when
/// Redis's queue is full).
@_spi(Fuzzing) public typealias IngestPublish =
    @Sendable (_ events: [IncomingEvent], _ readAt: NIODeadline, _ done: @escaping @Sendable () -> Void)
    -> EventLoopFuture<Void>?

/// Entry points for code outside the relay (the fuzz harnesses) that runs an ingest handler in an
/// `EmbeddedChannel`.
@_spi(Fuzzing) public enum IngestSeam {
    /// An ingest handler for one emitter connection, publishing through `publish`.
    ///
    /// Call on `eventLoop` (the budget is bound to it). The connection has no socket: a drain
    /// shuts nothing, and its peer is pid 0, uid 0.
    /// - Parameters:
    ///   - maxEventBytes: `--max-event-bytes`, the longest line accepted.
    ///   - budgetBytes: `--max-inflight-bytes`, the bytes of batches whose `done` has not run
    ///     before reading pauses.
    ///   - grants: the connection's `--publish-grant` topics; nil takes every topic.
    public static func handler(
        maxEventBytes: Int, budgetBytes: Int, grants: GrantSet? = nil, eventLoop: any EventLoop,
        publish: @escaping IngestPublish
    ) -> any ChannelHandler {
        let environment = IngestEnvironment(
            publish: publish, metrics: RelayMetrics(), maxEventBytes: maxEventBytes,
            logger: Logger(label: "progress-relay.ingest-seam", factory: { _ in SwiftLogNoOpLogHandler() }),
            budget: NIOLoopBound(IngestBudget(limit: budgetBytes), eventLoop: eventLoop),
            emitters: EmitterLimits(settings: EmitterLimitSettings()))
        return IngestHandler(environment: environment, peer: PeerCredentials(pid: 0, uid: 0, grants: grants))
    }
}
