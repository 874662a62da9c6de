// SystemCalls: the retry on EINTR, the error that names the call and what it was about, and the
// calls the listeners rely on, made for real on sockets, pipes and files of the test's own.

#if canImport(Glibc)
import Foundation
import Glibc
import NIOCore
import Testing

@testable import RelayServer

@Suite struct SystemCallsRetryTests {
    @Test func anInterruptedCallIsMadeAgainUntilItIsNot() throws {
        var calls = 0
        let result = try SystemCalls.retrying("read", .descriptor(3)) { () -> Int in
            calls += 1
            if calls < 3 {
                errno = EINTR
                return -1
            }
            return 42
        }
        #expect(result == 42)
        #expect(calls == 3)
    }

    @Test func anyOtherFailureThrowsAtOnceNamingTheCallAndThePath() {
        var calls = 0
        #expect(throws: SystemCallError(call: "bind", subject: .path("/run/p.sock"), code: EACCES)) {
            try SystemCalls.retrying("bind", .path("/run/p.sock")) { () -> CInt in
                calls += 1
                errno = EACCES
                return -1
            }
        }
        #expect(calls == 1)
    }

    @Test func aCallThatMustNotBeRepeatedReportsEINTR() {
        var calls = 0
        #expect(throws: SystemCallError(call: "connect", subject: .path("/p"), code: EINTR)) {
            try SystemCalls.once("connect", .path("/p")) { () -> CInt in
                calls += 1
                errno = EINTR
                return -1
            }
        }
        #expect(calls == 1)
    }

    @Test func resultsOtherThanMinusOneAreNotFailures() throws {
        errno = EACCES
        #expect(try SystemCalls.retrying("read", nil) { 0 } == 0)
        #expect(try SystemCalls.retrying("poll", nil) { CInt(-2) } == -2)
    }
}

@Suite struct SystemCallErrorTests {
    @Test func theMessageNamesTheCallWhatItWasAboutAndTheReason() {
        #expect(
            SystemCallError(call: "bind", subject: .path("/run/p.sock"), code: EACCES).description
                == "bind /run/p.sock: Permission denied")
        #expect(
            SystemCallError(call: "bind", subject: .address("127.0.0.1:80"), code: EADDRINUSE).description
                == "bind 127.0.0.1:80: Address already in use")
        #expect(
            SystemCallError(call: "getsockname", subject: .descriptor(7), code: EBADF).description
                == "getsockname (descriptor 7): Bad file descriptor")
        #expect(SystemCallError(call: "pipe", subject: nil, code: EMFILE).description == "pipe: Too many open files")
    }

    @Test func aRealFailureCarriesErrnoAndThePath() throws {
        let directory = try TemporaryDirectory()
        let missing = directory.path + "/missing/file"
        let error = try #require(throws: SystemCallError.self) { try SystemCalls.open(missing, O_RDONLY) }
        #expect(error.call == "open" && error.path == missing && error.code == ENOENT)
        #expect(throws: SystemCallError(call: "unlink", subject: .path(missing), code: ENOENT)) {
            try SystemCalls.unlink(missing)
        }
    }

    // What users read at start: the listeners' words around a SystemCallError.
    @Test func theSocketMessagesSayWhatTheRelayWasDoing() {
        let path = "/run/p.sock"
        let unlinkRefused = IngestSocketError.system(
            path, SystemCallError(call: "unlink", subject: .path(path), code: EACCES))
        #expect(
            unlinkRefused.description
                == "--socket /run/p.sock: removing the stale socket file: unlink failed: Permission denied")
        #expect(
            IngestSocketError.system(path, SystemCallError(call: "bind", subject: .path(path), code: ENOENT))
                .description == "--socket /run/p.sock: the directory /run does not exist")
        let probeRefused = IngestSocketError.cannotProbe(
            path, SystemCallError(call: "connect", subject: .path(path), code: EACCES))
        #expect(
            probeRefused.description
                == "--socket /run/p.sock: in use by someone else or not reachable (Permission denied); "
                + "refusing to replace it")
        let inUse = SystemCallError(call: "bind", subject: .address("127.0.0.1:8765"), code: EADDRINUSE)
        #expect(
            HTTPListener.BindError(failure: inUse, port: 8765).description
                == "cannot listen: Address already in use (another relay or server uses this port)")
    }
}

@Suite struct SystemCallsOnRealDescriptorsTests {
    @Test func aUnixListenerAcceptsNonBlockingCloseOnExecConnections() throws {
        let directory = try TemporaryDirectory()
        let path = directory.path + "/l.sock"
        let address = try #require(UnixAddress(path))
        let listener = try SystemCalls.socket(AF_UNIX, SOCK_STREAM)
        defer { SystemCalls.close(listener) }
        try SystemCalls.bind(listener, to: address, path: path)
        try SystemCalls.listen(listener, backlog: 8)
        #expect(try SystemCalls.getsockopt(listener, SOL_SOCKET, SO_ACCEPTCONN) == 1)
        #expect(fcntl(listener, F_GETFD) & FD_CLOEXEC != 0)

        // A second bind of the same path is refused, naming the path.
        let other = try SystemCalls.socket(AF_UNIX, SOCK_STREAM)
        defer { SystemCalls.close(other) }
        #expect(throws: SystemCallError(call: "bind", subject: .path(path), code: EADDRINUSE)) {
            try SystemCalls.bind(other, to: address, path: path)
        }

        let client = try SystemCalls.socket(AF_UNIX, SOCK_STREAM)
        defer { SystemCalls.close(client) }
        try SystemCalls.connect(client, to: address, path: path)
        let connection = try SystemCalls.accept(listener)
        defer { SystemCalls.close(connection) }
        #expect(fcntl(connection, F_GETFL) & O_NONBLOCK != 0)
        #expect(fcntl(connection, F_GETFD) & FD_CLOEXEC != 0)

        // The drain's shutdown(SHUT_RD): what was written is still read, then end of file, and
        // the writer's next write fails (MSG_NOSIGNAL: EPIPE, not a signal).
        try SystemCalls.writeAll(client, Array("line\n".utf8))
        try SystemCalls.shutdown(connection, SHUT_RD)
        #expect(try SystemCalls.readToEnd(connection) == Array("line\n".utf8))
        let sent = send(client, "x", 1, CInt(MSG_NOSIGNAL))
        #expect(sent == -1 && errno == EPIPE)
    }

    @Test func nobodyListeningIsConnectionRefused() throws {
        let directory = try TemporaryDirectory()
        let path = directory.path + "/stale.sock"
        let address = try #require(UnixAddress(path))
        let stale = try SystemCalls.socket(AF_UNIX, SOCK_STREAM)
        try SystemCalls.bind(stale, to: address, path: path)
        SystemCalls.close(stale)
        #expect((try SystemCalls.lstat(path).st_mode & S_IFMT) == S_IFSOCK)
        let probe = try SystemCalls.socket(AF_UNIX, SOCK_STREAM)
        defer { SystemCalls.close(probe) }
        #expect(throws: SystemCallError(call: "connect", subject: .path(path), code: ECONNREFUSED)) {
            try SystemCalls.connect(probe, to: address, path: path)
        }
    }

    /// The option names and levels come from the headers; these are the values the kernel gives back.
    @Test func socketOptionsFromTheHeaders() throws {
        var pair: [CInt] = [-1, -1]
        try #require(socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue), 0, &pair) == 0)
        defer { pair.forEach(SystemCalls.close) }
        #expect(try SystemCalls.getsockopt(pair[0], SOL_SOCKET, SO_TYPE) == CInt(SOCK_STREAM.rawValue))
        #expect(try SystemCalls.getsockopt(pair[0], SOL_SOCKET, SO_DOMAIN) == AF_UNIX)

        struct UCred {
            var pid: Int32 = 0
            var uid: UInt32 = 0
            var gid: UInt32 = 0
        }
        var credentials = UCred()
        let length = try SystemCalls.getsockopt(pair[0], SOL_SOCKET, SO_PEERCRED, into: &credentials)
        #expect(length == MemoryLayout<UCred>.size)
        #expect(credentials.pid == getpid() && credentials.uid == geteuid() && credentials.gid == getegid())

        // The kernel doubles SO_SNDBUF (for its bookkeeping), as HTTPListener's comment says.
        try SystemCalls.setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, 64 * 1024)
        #expect(try SystemCalls.getsockopt(pair[0], SOL_SOCKET, SO_SNDBUF) == 128 * 1024)

        #expect(throws: SystemCallError(call: "getsockopt", subject: .descriptor(-1), code: EBADF)) {
            try SystemCalls.getsockopt(-1, SOL_SOCKET, SO_TYPE)
        }
    }

    @Test func getsocknameGivesThePortTheKernelChose() throws {
        let fd = try SystemCalls.socket(AF_INET, SOCK_STREAM)
        defer { SystemCalls.close(fd) }
        try SystemCalls.bind(fd, to: try SocketAddress(ipAddress: "127.0.0.1", port: 0))
        let bound = try SystemCalls.getsockname(fd)
        #expect(bound.ipAddress == "127.0.0.1")
        #expect((bound.port ?? 0) > 0)
    }

    @Test func aPipeIsNonBlockingAndAnEmptyReadSaysSo() throws {
        let pipe = try SystemCalls.pipe()
        defer {
            SystemCalls.close(pipe.read)
            SystemCalls.close(pipe.write)
        }
        for fd in [pipe.read, pipe.write] {
            #expect(fcntl(fd, F_GETFL) & O_NONBLOCK != 0)
            #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0)
        }
        var byte: [UInt8] = [0]
        let error = try #require(throws: SystemCallError.self) {
            try byte.withUnsafeMutableBytes { try SystemCalls.read(pipe.read, into: $0) }
        }
        #expect(error.code == EAGAIN && error.call == "read" && error.subject == .descriptor(pipe.read))
    }

    @Test func aFileIsWrittenSyncedRenamedAndReadBack() throws {
        let directory = try TemporaryDirectory()
        let temporary = directory.path + "/f.tmp"
        let final = directory.path + "/f"
        let bytes = (0..<200_000).map { UInt8(truncatingIfNeeded: $0) }
        let fd = try SystemCalls.open(temporary, O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
        try SystemCalls.writeAll(fd, bytes, .path(temporary))
        try SystemCalls.fsync(fd)
        SystemCalls.close(fd)
        try SystemCalls.rename(temporary, to: final)
        #expect(try SystemCalls.stat(final).st_size == 200_000)

        let reading = try SystemCalls.open(final, O_RDONLY)
        defer { SystemCalls.close(reading) }
        #expect(try SystemCalls.readToEnd(reading, .path(final)) == bytes)
        // With a limit, reading stops once past it: the caller sees that there was more.
        _ = lseek(reading, 0, SEEK_SET)
        let limited = try SystemCalls.readToEnd(reading, .path(final), limit: 1000)
        #expect(limited.count > 1000 && limited.count < bytes.count)

        #expect(throws: SystemCallError(call: "rename", subject: .path(temporary), code: ENOENT)) {
            try SystemCalls.rename(temporary, to: final)
        }
    }
}

/// A directory under /tmp, removed with what it holds.
private final class TemporaryDirectory {
    let path: String

    init() throws {
        path = "/tmp/syscalls-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}
#endif
