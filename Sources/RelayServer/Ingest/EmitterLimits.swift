// EmitterLimits: how many emitter connections the relay holds, in all and per uid.
//
// An emitter counts a line as written once the kernel took its bytes, so the
// relay never closes a connection to enforce these bounds. Over the total it
// stops accepting: new connections, and what they write, wait in the listen
// backlog, as writers wait under backpressure. A uid over its share has its
// further connections accepted but parked (not read) until one of its read
// connections ends; so one local user cannot take every slot, and the total
// still bounds descriptors and per-connection memory whatever the uids.

import NIOConcurrencyHelpers
import NIOCore

/// The emitter-side bounds `serve` was given.
public struct EmitterLimitSettings: Sendable {
    /// `--max-emitters`: connections accepted at once, parked ones included.
    public var maxEmitters: Int
    /// `--max-emitters-per-uid`: connections of one uid read at once.
    public var maxEmittersPerUID: Int
    /// `--emitter-idle-timeout`: a read connection that sends nothing for this long is drained.
    public var idleTimeout: TimeAmount
    /// `--emitter-partial-line-timeout`: an unfinished line this old drains its connection.
    public var partialLineTimeout: TimeAmount

    // The defaults, here only: `serve`'s flags show and use these.
    /// `--max-emitters`.
    public static let defaultMaxEmitters = 4096
    /// `--max-emitters-per-uid`, or `--max-emitters` when that is lower.
    public static let defaultMaxEmittersPerUID = 1024
    /// `--emitter-idle-timeout`.
    public static let defaultIdleTimeout: TimeAmount = .seconds(3600)
    /// `--emitter-partial-line-timeout`.
    public static let defaultPartialLineTimeout: TimeAmount = .seconds(60)

    public init(
        maxEmitters: Int = EmitterLimitSettings.defaultMaxEmitters,
        maxEmittersPerUID: Int = EmitterLimitSettings.defaultMaxEmittersPerUID,
        idleTimeout: TimeAmount = EmitterLimitSettings.defaultIdleTimeout,
        partialLineTimeout: TimeAmount = EmitterLimitSettings.defaultPartialLineTimeout
    ) {
        self.maxEmitters = maxEmitters
        self.maxEmittersPerUID = maxEmittersPerUID
        self.idleTimeout = idleTimeout
        self.partialLineTimeout = partialLineTimeout
    }
}

/// Shared by the accept thread (which counts connections in) and the hub's loop (where they end),
/// hence a lock rather than loop binding; it is taken once per connect and close only.
final class EmitterLimits: Sendable {
    let settings: EmitterLimitSettings

    /// A connection's place in its uid's share.
    struct Admission: Sendable {
        let uid: UInt32
        let id: UInt64
        /// False while parked; the resume closure given to `enter` runs when it may read.
        let reading: Bool
    }

    private struct Share {
        var reading = 0
        var parked: [(id: UInt64, resume: @Sendable () -> Void)] = []
    }

    private struct State {
        var open = 0
        var nextID: UInt64 = 0
        var shares: [UInt32: Share] = [:]
        /// Shutdown: every connection must be read to its end, so none is parked any more.
        var draining = false
    }

    private let state = NIOLockedValueBox(State())

    init(settings: EmitterLimitSettings) {
        self.settings = settings
    }

    // MARK: The total (accept thread and hub loop)

    /// Whether the accept thread may take one more connection now.
    var hasRoom: Bool { state.withLockedValue { $0.open < settings.maxEmitters } }

    /// A connection was accepted (counted before its channel exists, so the check above holds).
    func opened() {
        state.withLockedValue { $0.open += 1 }
    }

    /// A connection ended; true when that made room again, so the accept thread must be woken.
    func closed() -> Bool {
        state.withLockedValue { state in
            state.open -= 1
            return state.open == settings.maxEmitters - 1
        }
    }

    var openCount: Int { state.withLockedValue { $0.open } }

    // MARK: Per uid (hub loop)

    /// Takes a place in `uid`'s share: reading at once when the uid is under it (or the relay is
    /// draining), else parked until `resume` is called, oldest parked first.
    func enter(uid: UInt32, resume: @escaping @Sendable () -> Void) -> Admission {
        state.withLockedValue { state in
            state.nextID += 1
            let id = state.nextID
            var share = state.shares[uid, default: Share()]
            defer { state.shares[uid] = share }
            if share.reading < settings.maxEmittersPerUID || state.draining {
                share.reading += 1
                return Admission(uid: uid, id: id, reading: true)
            }
            share.parked.append((id, resume))
            return Admission(uid: uid, id: id, reading: false)
        }
    }

    /// Gives the place back; the uid's oldest parked connection, if any, starts reading.
    func leave(_ admission: Admission, wasReading: Bool) {
        let resume: (@Sendable () -> Void)? = state.withLockedValue { state in
            guard var share = state.shares[admission.uid] else { return nil }
            var next: (@Sendable () -> Void)?
            if wasReading {
                share.reading -= 1
                if share.reading < settings.maxEmittersPerUID, !share.parked.isEmpty {
                    next = share.parked.removeFirst().resume
                    share.reading += 1
                }
            } else {
                share.parked.removeAll { $0.id == admission.id }
            }
            state.shares[admission.uid] = share.reading == 0 && share.parked.isEmpty ? nil : share
            return next
        }
        resume?()
    }

    /// Shutdown: every parked connection starts reading, so the drain reads what it holds.
    func releaseAll() {
        let resumes = state.withLockedValue { state -> [@Sendable () -> Void] in
            state.draining = true
            var all = [@Sendable () -> Void]()
            for (uid, var share) in state.shares {
                share.reading += share.parked.count
                all += share.parked.map(\.resume)
                share.parked = []
                state.shares[uid] = share
            }
            return all
        }
        for resume in resumes { resume() }
    }
}
