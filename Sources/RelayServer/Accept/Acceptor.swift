// Acceptor: the accept loop of one listening socket, on a thread of its own.
//
// Both listeners (the ingest socket and the HTTP port) accept here and hand
// each new descriptor to NIO with `ClientBootstrap.withConnectedSocket`.
// Owning `accept` lets the relay keep each ingest descriptor for the
// shutdown drain, and lets it refuse connections cleanly when descriptors
// run out: a spare descriptor is kept open; on EMFILE/ENFILE it is closed,
// the waiting connection is accepted and closed at once (the client sees
// the refusal and may retry), and the spare is taken again. NIO's server
// channel retries a failing accept from a level-triggered epoll instead,
// which spins a core (seen with swift-nio 2.101 even with its
// AcceptBackoffHandler).

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore

final class Acceptor: Sendable {
    let descriptor: CInt
    private let name: String
    private let wake: (read: CInt, write: CInt)
    private let stopped = NIOLockedValueBox(false)
    /// True until `start`, and again once the thread is done: what `stop` waits for.
    private let finished = NIOLockedValueBox(true)

    /// - Parameter descriptor: a listening stream socket; made non-blocking here.
    init(descriptor: CInt, name: String) throws {
        self.descriptor = descriptor
        self.name = name
        wake = try SystemCalls.pipe()
        SystemCalls.setNonBlocking(descriptor)
    }

    /// Starts the thread; `handOff` receives each accepted, non-blocking, close-on-exec descriptor
    /// and returns when the connection is set up. With `acceptingPendingOnStop`, `stop` first
    /// accepts every connection already waiting in the backlog and waits for their set-up: an
    /// emitter's connect and write succeed while it waits there, so dropping it would lose lines
    /// the emitter believes written.
    /// With `mayAccept`, the listening socket is left alone while it answers false: connections
    /// wait in the kernel's backlog (their writes too) until `nudge` says to look again.
    func start(
        logger: Logger, acceptingPendingOnStop: Bool = false, mayAccept: (@Sendable () -> Bool)? = nil,
        handOff: @escaping @Sendable (CInt) -> EventLoopFuture<Void>
    ) {
        finished.withLockedValue { $0 = false }
        let thread = Thread { [self] in
            self.run(logger: logger, mayAccept: mayAccept, handOff: handOff)
            if acceptingPendingOnStop { self.acceptPending(handOff: handOff) }
            self.finished.withLockedValue { $0 = true }
        }
        thread.name = name
        thread.start()
    }

    private func run(logger: Logger, mayAccept: (@Sendable () -> Bool)?, handOff: @Sendable (CInt) -> EventLoopFuture<Void>) {
        var spare = Self.openSpare()
        var fds = [
            pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0),
            pollfd(fd: wake.read, events: Int16(POLLIN), revents: 0),
        ]
        var lastWarning = NIODeadline.uptimeNanoseconds(0)
        var refused = 0
        while !stopped.withLockedValue({ $0 }) {
            fds[0].revents = 0
            fds[1].revents = 0
            // poll skips a negative descriptor: while there is no room only the wake pipe is watched.
            fds[0].fd = mayAccept?() == false ? -1 : descriptor
            guard (try? SystemCalls.poll(&fds, timeout: -1)) != nil else { break }
            if fds[1].revents != 0 {
                var bytes = [UInt8](repeating: 0, count: 64)
                while let count = try? bytes.withUnsafeMutableBytes({ try SystemCalls.read(wake.read, into: $0) }),
                    count > 0
                {}
                if stopped.withLockedValue({ $0 }) { break }
                continue
            }
            guard fds[0].revents != 0 else { continue }
            let failure: SystemCallError
            do {
                _ = handOff(try SystemCalls.accept(descriptor))
                continue
            } catch {
                failure = error
            }
            switch failure.code {
            case EAGAIN, EWOULDBLOCK, ECONNABORTED, EPROTO:
                continue
            case EMFILE, ENFILE:
                // Refuse the waiting connection with the spare descriptor rather than leave it to spin.
                if let held = spare {
                    SystemCalls.close(held)
                    if let refusedConnection = try? SystemCalls.accept(descriptor) {
                        SystemCalls.close(refusedConnection)
                        refused += 1
                    }
                } else {
                    usleep(10_000)
                }
                spare = Self.openSpare()
            default:
                usleep(10_000)
            }
            if NIODeadline.now() - lastWarning > .seconds(10) {
                lastWarning = .now()
                logger.warning(
                    "cannot accept connections, refusing them",
                    metadata: ["listener": "\(name)", "error": "\(failure.reason)", "refused": "\(refused)"])
            }
        }
        if let spare { SystemCalls.close(spare) }
    }

    /// The backlog's connections, set up before the thread ends (bounded: a flood cannot hold
    /// the shutdown).
    private func acceptPending(handOff: @Sendable (CInt) -> EventLoopFuture<Void>) {
        for _ in 0..<4096 {
            let connection: CInt
            do {
                connection = try SystemCalls.accept(descriptor)
            } catch {
                if error.code == ECONNABORTED { continue }
                return
            }
            // A plain thread, not an event loop: waiting here blocks nothing of NIO's.
            try? handOff(connection).wait()
        }
    }

    /// Stops accepting and waits (briefly) for the thread to leave `accept`; the socket stays open.
    func stop() {
        let already = stopped.withLockedValue { value -> Bool in
            defer { value = true }
            return value
        }
        guard !already else { return }
        try? SystemCalls.writeAll(wake.write, [1])
        for _ in 0..<200 where !finished.withLockedValue({ $0 }) { usleep(5_000) }
    }

    /// Makes the thread ask `mayAccept` again (a connection ended and made room).
    func nudge() {
        try? SystemCalls.writeAll(wake.write, [0])
    }

    /// The descriptor kept for refusing connections when none are left; nil when none could be had.
    private static func openSpare() -> CInt? {
        try? SystemCalls.open("/dev/null", O_RDONLY)
    }
}
