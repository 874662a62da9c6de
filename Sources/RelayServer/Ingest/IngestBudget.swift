// IngestBudget: how far the hub may run ahead of the subscriber loops.
//
// Every emitter connection lives on the hub's loop and draws on this one
// budget: a batch's event bytes are taken when it is published and given
// back once every subscriber loop has written it. While the budget is spent,
// connections stop reading and the kernel holds their writers back.
//
// Why one shared budget and not one per connection: the budget is also what
// lets the subscriber loops coalesce. A loop writes each connection once per
// turn, so the frames a subscriber gets per system call are the events in
// flight divided by the subscribers they are spread over; with 5,000 topics,
// 1 MiB in flight left about one frame per write. A total (not per
// connection) keeps that independent of how many emitters there are, and
// bounds the memory no matter how many connect.
//
// In cluster mode the lines go to Redis instead, through the publisher's own
// bounded queue; when that queue is full the budget is blocked until it has
// room again, which holds every emitter back the same way.

import NIOCore

final class IngestBudget {
    /// The bytes that may be in flight at once, over all emitter connections.
    let limit: Int
    private(set) var inFlight = 0
    private var waiting: [() -> Void] = []
    /// Blocks that have not ended (`block(until:)`).
    private var blocks = 0

    init(limit: Int) {
        self.limit = limit
    }

    var isSpent: Bool { inFlight >= limit || blocks > 0 }

    func take(_ bytes: Int) {
        inFlight += bytes
    }

    /// Returns `bytes`; when the budget is no longer spent, every waiting connection resumes reading.
    func give(_ bytes: Int) {
        inFlight -= bytes
        resumeIfRoom()
    }

    /// Counts the budget as spent until `future` completes (on this loop), whatever else is in flight.
    func block(until future: EventLoopFuture<Void>) {
        blocks += 1
        future.assumeIsolated().whenComplete { _ in
            self.blocks -= 1
            self.resumeIfRoom()
        }
    }

    private func resumeIfRoom() {
        guard !isSpent, !waiting.isEmpty else { return }
        let resumed = waiting
        waiting = []
        for resume in resumed { resume() }
    }

    /// Runs `resume` once the budget is no longer spent.
    func wait(_ resume: @escaping () -> Void) {
        waiting.append(resume)
    }
}
