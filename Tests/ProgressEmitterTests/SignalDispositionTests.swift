// The emitter and the host process's signals: a library must not change how its host handles
// SIGPIPE. Its writes use MSG_NOSIGNAL, so a relay that went away is an EPIPE error, never a
// signal, whatever the host's disposition.
//
// Both checks live with other suites in one test process, and NIO (which those suites use) sets
// SIGPIPE to SIG_IGN process-wide, once, when it makes its first socket. So the write is checked
// on this thread alone (SIGPIPE blocked: a raised one stays pending, even when ignored), and the
// disposition check allows that one foreign change.

#if canImport(Glibc)
import Foundation
import Glibc
import ProgressEmitter
import Testing

/// The test's own SIGPIPE handler: does nothing; only its address matters.
private let testHandler: @convention(c) (CInt) -> Void = { _ in }

@Suite("The emitter leaves SIGPIPE alone", .serialized)
struct SignalDispositionTests {
    @Test("a write to a relay that went away fails with EPIPE and raises no SIGPIPE")
    func writeToARelayThatWentAway() throws {
        let relay = try ListeningSocket()
        defer { relay.close() }
        let connection = try RelaySocket(path: relay.path)
        relay.acceptAndCloseOne()

        // Blocked on this thread, a SIGPIPE the write raises stays pending (Linux keeps blocked
        // signals even when their disposition is SIG_IGN), so nothing is lost and nothing dies.
        var block = sigset_t()
        var saved = sigset_t()
        sigemptyset(&block)
        sigaddset(&block, SIGPIPE)
        try #require(pthread_sigmask(SIG_BLOCK, &block, &saved) == 0)
        defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
        try #require(!Self.sigpipeIsPending(), "a SIGPIPE was pending before the test")

        var failure: RelaySocketError?
        for _ in 0..<100 where failure == nil {
            do {
                try connection.write(Array("{\"topic\":\"t\",\"type\":\"x\"}\n".utf8))
            } catch let error as RelaySocketError {
                failure = error
            }
        }
        #expect(failure?.code == EPIPE)
        let raised = Self.sigpipeIsPending()
        if raised {
            var info = siginfo_t()
            var timeout = timespec()
            _ = sigtimedwait(&block, &info, &timeout)  // consumed, so it never reaches the process
        }
        #expect(!raised, "the write raised SIGPIPE: with the default disposition the host would be killed")
    }

    @Test("connecting, writing and an emitter's reconnects leave the host's SIGPIPE handler in place")
    func dispositionIsLeftAsFound() throws {
        var before = sigaction()
        try #require(sigaction(SIGPIPE, nil, &before) == 0)
        var foreign: sigaction?
        var replaced = true
        // NIO's one-time SIG_IGN may land during the first round; a second replacement is the emitter's.
        for _ in 0..<2 where replaced {
            var ours = sigaction()
            ours.__sigaction_handler.sa_handler = testHandler
            sigemptyset(&ours.sa_mask)
            try #require(sigaction(SIGPIPE, &ours, nil) == 0)

            let relay = try ListeningSocket()
            let connection = try RelaySocket(path: relay.path)
            relay.acceptAndCloseOne()
            _ = try? connection.write(Array("{\"topic\":\"t\"}\n".utf8))
            let emitter = ProgressEmitter(socketPath: relay.path)
            for i in 0..<5 {
                emitter.emit(topic: "t", fields: ["i": i])
                relay.acceptAndCloseOne()
            }
            emitter.close(timeout: .milliseconds(200))
            relay.close()

            var now = sigaction()
            try #require(sigaction(SIGPIPE, nil, &now) == 0)
            replaced = !Self.isTestHandler(now)
            if replaced { foreign = now }
        }
        // The process goes on as it was, or as NIO set it meanwhile.
        var restored = foreign ?? before
        sigaction(SIGPIPE, &restored, nil)
        #expect(!replaced, "the emitter changed SIGPIPE's disposition")
    }

    private static func sigpipeIsPending() -> Bool {
        var pending = sigset_t()
        sigpending(&pending)
        return sigismember(&pending, SIGPIPE) == 1
    }

    private static func isTestHandler(_ action: sigaction) -> Bool {
        guard let handler = action.__sigaction_handler.sa_handler else { return false }
        let installed = unsafeBitCast(handler, to: UnsafeRawPointer.self)
        return installed == unsafeBitCast(testHandler, to: UnsafeRawPointer.self)
    }
}

/// A Unix socket that listens and accepts nothing until told: the stand-in for a relay that goes away.
private final class ListeningSocket {
    let path: String
    private var descriptor: CInt

    init() throws {
        path = "/tmp/pe-sigpipe-\(getpid())-\(UUID().uuidString.prefix(8)).sock"
        descriptor = socket(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0)
        try #require(descriptor >= 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: Array(path.utf8) + [0]) }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        try #require(bound == 0 && listen(descriptor, 16) == 0)
    }

    deinit { close() }

    /// Accepts one waiting connection (waiting up to a second for it) and closes it at once.
    func acceptAndCloseOne() {
        guard descriptor >= 0 else { return }
        var ready = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        guard poll(&ready, 1, 1000) == 1 else { return }
        let connection = accept(descriptor, nil, nil)
        if connection >= 0 { Glibc.close(connection) }
    }

    func close() {
        guard descriptor >= 0 else { return }
        Glibc.close(descriptor)
        descriptor = -1
        unlink(path)
    }
}
#endif
