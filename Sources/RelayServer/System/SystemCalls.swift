// SystemCalls: the raw calls the relay and its CLI make into the C library, and the one error
// they throw.
//
// In the spirit of NIO's `Posix` (NIOPosix/System.swift): a call a signal interrupts (EINTR) is
// made again in `retrying`, the one loop that knows about EINTR, and a call that fails becomes a
// `SystemCallError` that names the call, the path, address or descriptor it was about, and errno.
// What a failure means (a stale socket file, a port in use, a state file that cannot be removed)
// the caller says, in its own words. Two calls are never retried: `close`, because on Linux the
// descriptor is gone even when close reports EINTR (a retry could close one another thread just
// opened), and `connect`, because an interrupted connect goes on in the background and a second
// one fails with EALREADY. Socket levels and option names come from the headers (`SOL_SOCKET`,
// `SO_PEERCRED`, ...) at the call sites.
//
// Linux only, like the server: socket activation, `SO_PEERCRED` and `SO_PEERGROUPS`, and
// Glibc's types (`__socket_type`) are assumed. ProgressEmitter keeps calls of its own: it links
// nothing of the server.

#if canImport(Glibc)
import Glibc
#endif
import NIOCore

/// A system call that failed: which call, on what, and errno.
public struct SystemCallError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What the call was about, for the message.
    public enum Subject: Equatable, Sendable {
        case path(String)
        /// A network address, `host:port`.
        case address(String)
        case descriptor(CInt)
    }

    /// The C function, e.g. `bind`.
    public let call: String
    public let subject: Subject?
    /// errno as the call left it.
    public let code: CInt

    public init(call: String, subject: Subject?, code: CInt) {
        self.call = call
        self.subject = subject
        self.code = code
    }

    /// The C library's words for `code`, e.g. "Permission denied".
    public var reason: String { String(cString: strerror(code)) }

    /// The path the call was about, when it was about one.
    public var path: String? {
        if case .path(let path) = subject { return path }
        return nil
    }

    /// `bind /run/progress.sock: Permission denied`, `getsockname (descriptor 7): Bad file descriptor`.
    public var description: String {
        switch subject {
        case .path(let path): return "\(call) \(path): \(reason)"
        case .address(let address): return "\(call) \(address): \(reason)"
        case .descriptor(let fd): return "\(call) (descriptor \(fd)): \(reason)"
        case nil: return "\(call): \(reason)"
        }
    }
}

/// The relay's system calls (see the file's header). Descriptors they make are close-on-exec.
package enum SystemCalls {
    // MARK: The retry

    /// `body`'s result, made again while it fails with EINTR; any other failure (-1) throws.
    package static func retrying<Result: SignedInteger>(
        _ call: String, _ subject: SystemCallError.Subject?, _ body: () -> Result
    ) throws(SystemCallError) -> Result {
        while true {
            let result = body()
            if result != -1 { return result }
            let code = errno
            if code == EINTR { continue }
            throw SystemCallError(call: call, subject: subject, code: code)
        }
    }

    /// `body`'s result, made once: for the calls that must not be repeated (see the file's header).
    package static func once<Result: SignedInteger>(
        _ call: String, _ subject: SystemCallError.Subject?, _ body: () -> Result
    ) throws(SystemCallError) -> Result {
        let result = body()
        if result == -1 { throw SystemCallError(call: call, subject: subject, code: errno) }
        return result
    }

    // MARK: Files

    /// Opens `path`; close-on-exec is added to `flags`.
    package static func open(_ path: String, _ flags: CInt, mode: mode_t = 0) throws(SystemCallError) -> CInt {
        try retrying("open", .path(path)) { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    /// Closes `fd`, once and without a word: nothing is to be done about a failed close.
    package static func close(_ fd: CInt) {
        _ = Glibc.close(fd)
    }

    /// What `read(2)` read into `buffer`: 0 at end of file.
    package static func read(
        _ fd: CInt, into buffer: UnsafeMutableRawBufferPointer, _ subject: SystemCallError.Subject? = nil
    ) throws(SystemCallError) -> Int {
        try retrying("read", subject ?? .descriptor(fd)) { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    /// Everything up to end of file, or the first `limit` bytes and more once there are more than
    /// `limit` (so the caller sees that there were).
    package static func readToEnd(
        _ fd: CInt, _ subject: SystemCallError.Subject? = nil, limit: Int = Int.max
    ) throws(SystemCallError) -> [UInt8] {
        var bytes = [UInt8]()
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 1)
        defer { chunk.deallocate() }
        while bytes.count <= limit {
            let count = try read(fd, into: chunk, subject)
            if count == 0 { break }
            bytes += chunk[..<count]
        }
        return bytes
    }

    /// How much of `bytes` `write(2)` took.
    package static func write(
        _ fd: CInt, _ bytes: UnsafeRawBufferPointer, _ subject: SystemCallError.Subject? = nil
    ) throws(SystemCallError) -> Int {
        try retrying("write", subject ?? .descriptor(fd)) { Glibc.write(fd, bytes.baseAddress, bytes.count) }
    }

    /// Writes every byte of `bytes`, across short writes.
    package static func writeAll(
        _ fd: CInt, _ bytes: UnsafeRawBufferPointer, _ subject: SystemCallError.Subject? = nil
    ) throws(SystemCallError) {
        var offset = 0
        while offset < bytes.count {
            offset += try write(fd, UnsafeRawBufferPointer(rebasing: bytes[offset...]), subject)
        }
    }

    /// Writes every byte of `bytes`, across short writes.
    package static func writeAll(
        _ fd: CInt, _ bytes: [UInt8], _ subject: SystemCallError.Subject? = nil
    ) throws(SystemCallError) {
        let written = bytes.withUnsafeBytes { raw in
            Result { () throws(SystemCallError) in try writeAll(fd, raw, subject) }
        }
        try written.get()
    }

    package static func fsync(_ fd: CInt, _ subject: SystemCallError.Subject? = nil) throws(SystemCallError) {
        _ = try retrying("fsync", subject ?? .descriptor(fd)) { Glibc.fsync(fd) }
    }

    /// Replaces `destination` with `source` (named in the error: the file that did not move).
    package static func rename(_ source: String, to destination: String) throws(SystemCallError) {
        _ = try retrying("rename", .path(source)) { Glibc.rename(source, destination) }
    }

    package static func unlink(_ path: String) throws(SystemCallError) {
        _ = try retrying("unlink", .path(path)) { Glibc.unlink(path) }
    }

    /// What `path` is, following a symbolic link.
    package static func stat(_ path: String) throws(SystemCallError) -> Glibc.stat {
        var status = Glibc.stat()
        _ = try retrying("stat", .path(path)) { statFollowing(path, &status) }
        return status
    }

    /// What `path` itself is: a symbolic link is not followed.
    package static func lstat(_ path: String) throws(SystemCallError) -> Glibc.stat {
        var status = Glibc.stat()
        _ = try retrying("lstat", .path(path)) { statNotFollowing(path, &status) }
        return status
    }

    package static func fstat(
        _ fd: CInt, _ subject: SystemCallError.Subject? = nil
    ) throws(SystemCallError) -> Glibc.stat {
        var status = Glibc.stat()
        _ = try retrying("fstat", subject ?? .descriptor(fd)) { statOfDescriptor(fd, &status) }
        return status
    }

    /// Sets `path`'s mode without following a symbolic link (`fchmodat`, `AT_SYMLINK_NOFOLLOW`).
    package static func fchmodat(_ path: String, mode: mode_t) throws(SystemCallError) {
        _ = try retrying("fchmodat", .path(path)) { Glibc.fchmodat(AT_FDCWD, path, mode, AT_SYMLINK_NOFOLLOW) }
    }

    /// A pipe whose two ends are non-blocking and close-on-exec.
    package static func pipe() throws(SystemCallError) -> (read: CInt, write: CInt) {
        var fds: [CInt] = [-1, -1]
        _ = try retrying("pipe", nil) { Glibc.pipe(&fds) }
        for fd in fds {
            setNonBlocking(fd)
            setCloseOnExec(fd)
        }
        return (fds[0], fds[1])
    }

    /// Adds `O_NONBLOCK` (`fcntl`; it fails only for a descriptor that is not open).
    package static func setNonBlocking(_ fd: CInt) {
        _ = Glibc.fcntl(fd, F_SETFL, Glibc.fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    /// Adds `FD_CLOEXEC`, for descriptors made without it: accepted, inherited, from `pipe`
    /// (Glibc's module exports neither `accept4` nor `pipe2`).
    package static func setCloseOnExec(_ fd: CInt) {
        _ = Glibc.fcntl(fd, F_SETFD, Glibc.fcntl(fd, F_GETFD) | FD_CLOEXEC)
    }

    /// Waits for `fds`; EINTR is retried with the same timeout.
    @discardableResult
    package static func poll(_ fds: inout [pollfd], timeout: CInt) throws(SystemCallError) -> CInt {
        try retrying("poll", nil) { Glibc.poll(&fds, nfds_t(fds.count), timeout) }
    }

    // MARK: Sockets

    /// A close-on-exec socket of `family` (`AF_UNIX`, `AF_INET`, ...) and `type`.
    package static func socket(
        _ family: CInt, _ type: __socket_type, nonBlocking: Bool = false, _ subject: SystemCallError.Subject? = nil
    ) throws(SystemCallError) -> CInt {
        var flags = CInt(type.rawValue) | CInt(SOCK_CLOEXEC.rawValue)
        if nonBlocking { flags |= CInt(SOCK_NONBLOCK.rawValue) }
        return try retrying("socket", subject) { Glibc.socket(family, flags, 0) }
    }

    package static func bind(_ fd: CInt, to address: UnixAddress, path: String) throws(SystemCallError) {
        _ = try retrying("bind", .path(path)) { address.withSocketAddress { Glibc.bind(fd, $0, $1) } }
    }

    package static func bind(_ fd: CInt, to address: SocketAddress) throws(SystemCallError) {
        _ = try retrying("bind", .address(Self.text(of: address))) {
            address.withSockAddr { Glibc.bind(fd, $0, socklen_t($1)) }
        }
    }

    /// Connects once (see the file's header about EINTR).
    package static func connect(_ fd: CInt, to address: UnixAddress, path: String) throws(SystemCallError) {
        _ = try once("connect", .path(path)) { address.withSocketAddress { Glibc.connect(fd, $0, $1) } }
    }

    package static func listen(
        _ fd: CInt, backlog: CInt, _ subject: SystemCallError.Subject? = nil
    ) throws(SystemCallError) {
        _ = try retrying("listen", subject ?? .descriptor(fd)) { Glibc.listen(fd, backlog) }
    }

    /// A connection from the listening socket `fd`, made non-blocking and close-on-exec.
    package static func accept(_ fd: CInt) throws(SystemCallError) -> CInt {
        let connection = try retrying("accept", .descriptor(fd)) { Glibc.accept(fd, nil, nil) }
        setNonBlocking(connection)
        setCloseOnExec(connection)
        return connection
    }

    /// `how`: `SHUT_RD`, `SHUT_WR` or `SHUT_RDWR`.
    package static func shutdown(_ fd: CInt, _ how: Int) throws(SystemCallError) {
        _ = try retrying("shutdown", .descriptor(fd)) { Glibc.shutdown(fd, CInt(how)) }
    }

    /// An option whose value is an int (`SO_TYPE`, `SO_ACCEPTCONN`, `SO_DOMAIN`, `SO_SNDBUF`, ...).
    package static func getsockopt(_ fd: CInt, _ level: CInt, _ name: CInt) throws(SystemCallError) -> CInt {
        var value: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        _ = try retrying("getsockopt", .descriptor(fd)) { Glibc.getsockopt(fd, level, name, &value, &length) }
        return value
    }

    /// An option whose value is a C struct (`SO_PEERCRED`'s `struct ucred`); returns the length
    /// the kernel wrote, for the caller to check against the struct's size.
    package static func getsockopt<Value: BitwiseCopyable>(
        _ fd: CInt, _ level: CInt, _ name: CInt, into value: inout Value
    ) throws(SystemCallError) -> Int {
        var length = socklen_t(MemoryLayout<Value>.size)
        _ = try retrying("getsockopt", .descriptor(fd)) {
            withUnsafeMutableBytes(of: &value) { Glibc.getsockopt(fd, level, name, $0.baseAddress, &length) }
        }
        return Int(length)
    }

    /// An option of variable length (`SO_PEERGROUPS`). `length` is the buffer's size on the way
    /// in and what the kernel set on the way out, also when it throws (ERANGE: what it needs).
    package static func getsockopt(
        _ fd: CInt, _ level: CInt, _ name: CInt, into buffer: UnsafeMutableRawBufferPointer, length: inout socklen_t
    ) throws(SystemCallError) {
        var written = socklen_t(buffer.count)
        defer { length = written }
        _ = try retrying("getsockopt", .descriptor(fd)) {
            Glibc.getsockopt(fd, level, name, buffer.baseAddress, &written)
        }
    }

    /// Sets an option whose value is an int (`SO_REUSEADDR`, ...).
    package static func setsockopt(_ fd: CInt, _ level: CInt, _ name: CInt, _ value: CInt) throws(SystemCallError) {
        var value = value
        _ = try retrying("setsockopt", .descriptor(fd)) {
            Glibc.setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<CInt>.size))
        }
    }

    /// The address `fd` is bound to, e.g. the port the kernel chose for port 0.
    package static func getsockname(_ fd: CInt) throws(SystemCallError) -> SocketAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = try retrying("getsockname", .descriptor(fd)) {
            withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.getsockname(fd, $0, &length) }
            }
        }
        switch CInt(storage.ss_family) {
        case AF_INET6:
            return SocketAddress(withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in6.self) }, host: "")
        case AF_INET:
            return SocketAddress(withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in.self) }, host: "")
        default:
            throw SystemCallError(call: "getsockname", subject: .descriptor(fd), code: EAFNOSUPPORT)
        }
    }

    /// Sends one datagram to `address`, never raising SIGPIPE.
    @discardableResult
    package static func sendto(_ fd: CInt, _ bytes: [UInt8], to address: UnixAddress) throws(SystemCallError) -> Int {
        try retrying("sendto", .descriptor(fd)) {
            address.withSocketAddress { target, length in
                bytes.withUnsafeBytes { Glibc.sendto(fd, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL), target, length) }
            }
        }
    }

    // MARK: Limits

    /// The open files limit, soft and hard.
    package static func openFilesLimit() throws(SystemCallError) -> rlimit {
        var limit = rlimit()
        _ = try retrying("getrlimit", nil) { Glibc.getrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit) }
        return limit
    }

    package static func setOpenFilesLimit(_ limit: rlimit) throws(SystemCallError) {
        var limit = limit
        _ = try retrying("setrlimit", nil) { Glibc.setrlimit(CInt(RLIMIT_NOFILE.rawValue), &limit) }
    }

    private static func text(of address: SocketAddress) -> String {
        let host = address.ipAddress ?? "?"
        let port = address.port.map(String.init) ?? "?"
        return address.protocol == .inet6 ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}

// At file scope, where `stat` names the C function and not `SystemCalls.stat`.
private func statFollowing(_ path: String, _ status: inout stat) -> CInt { stat(path, &status) }
private func statNotFollowing(_ path: String, _ status: inout stat) -> CInt { lstat(path, &status) }
private func statOfDescriptor(_ fd: CInt, _ status: inout stat) -> CInt { fstat(fd, &status) }
