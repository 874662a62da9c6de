// StateFileStore: reading and atomically replacing `--state-file`.
//
// The file describes one moment: the relay consumes it on start (reads, then
// removes it) and writes a new one on a clean shutdown. A relay later killed
// therefore leaves no file, and the next start takes new epochs instead of
// claiming a numbering that lost events. A file that cannot be removed is
// never restored: restored on every start, it would hand out the same seq
// twice within one epoch.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore
import RelayHub

enum StateFileStore {
    enum Failure: Error, CustomStringConvertible {
        /// The state file's directory cannot take the file (checked before the relay serves).
        case directoryNotWritable(path: String, reason: String)
        case unreadable(path: String, reason: String)
        case notRemovable(path: String, reason: String)
        case damaged(path: String, reason: String)
        case write(path: String, reason: String)

        var description: String {
            switch self {
            case .directoryNotWritable(let path, let reason):
                return "--state-file \(path): the relay could not write its state there (\(reason))"
            case .unreadable(let path, let reason): return "\(path): cannot read it (\(reason))"
            case .notRemovable(let path, let reason): return "\(path): cannot remove it after reading (\(reason))"
            case .damaged(let path, let reason): return "\(path): damaged (\(reason))"
            case .write(let path, let reason): return "\(path): \(reason)"
            }
        }
    }

    /// Proves at start that shutdown will be able to write `path`, by creating and removing the
    /// temporary file it writes first: a read-only or foreign directory is found now, not at the
    /// first restart that loses every epoch.
    static func checkWritable(_ path: String) throws {
        let directory = Self.directory(of: path)
        var status = stat()
        guard stat(directory, &status) == 0 else {
            throw Failure.directoryNotWritable(path: path, reason: "\(directory): \(Self.reason(errno))")
        }
        guard (status.st_mode & S_IFMT) == S_IFDIR else {
            throw Failure.directoryNotWritable(path: path, reason: "\(directory) is not a directory")
        }
        if lstat(path, &status) == 0, (status.st_mode & S_IFMT) == S_IFDIR {
            throw Failure.directoryNotWritable(path: path, reason: "it is a directory")
        }
        let probe = temporaryPath(for: path)
        let fd = open(probe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            throw Failure.directoryNotWritable(path: path, reason: "\(probe): \(Self.reason(errno))")
        }
        close(fd)
        unlink(probe)
    }

    /// The topics in `path`, and the file is removed. Nil when there is no file. Throws when the
    /// file cannot be read, decoded or removed: the caller then starts with new epochs.
    static func take(_ path: String) throws -> [TopicState]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw Failure.unreadable(path: path, reason: reason(errno))
        }
        var data = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                let code = errno
                close(fd)
                throw Failure.unreadable(path: path, reason: reason(code))
            }
            if count == 0 { break }
            data += chunk[..<count]
        }
        close(fd)
        // Removed before it is believed: should that fail, the same numbering would be restored
        // at every start and two events would share a seq within one epoch.
        guard unlink(path) == 0 || errno == ENOENT else {
            throw Failure.notRemovable(path: path, reason: reason(errno))
        }
        do {
            return try StateFile.decode(ByteBuffer(bytes: data))
        } catch {
            throw Failure.damaged(path: path, reason: "\(error)")
        }
    }

    /// Writes to a temporary file beside `path`, syncs it, then renames it over `path`,
    /// so a crash leaves either the old state or the new one, never half of one.
    static func write(_ topics: [TopicState], to path: String) throws {
        let bytes = StateFile.encode(topics)
        let temporary = temporaryPath(for: path)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw Failure.write(path: path, reason: "\(temporary): \(reason(errno))") }
        var failure: Int32 = 0
        bytes.withUnsafeReadableBytes { raw in
            var offset = 0
            while offset < raw.count {
                let written = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    return
                }
                offset += written
            }
        }
        if failure == 0, fsync(fd) != 0 { failure = errno }
        close(fd)
        if failure == 0, rename(temporary, path) != 0 { failure = errno }
        if failure != 0 {
            unlink(temporary)
            throw Failure.write(path: path, reason: reason(failure))
        }
        // The rename is durable only once the directory is synced too.
        let directory = open(Self.directory(of: path), O_RDONLY | O_CLOEXEC)
        if directory >= 0 {
            fsync(directory)
            close(directory)
        }
    }

    private static func temporaryPath(for path: String) -> String { path + ".tmp" }

    private static func directory(of path: String) -> String {
        let directory = (path as NSString).deletingLastPathComponent
        return directory.isEmpty ? "." : directory
    }

    static func reason(_ code: Int32) -> String { String(cString: strerror(code)) }
}
