// TopicState: the state file, which lets a restart keep every topic's epoch.
//
// The format is NDJSON, so it can be read with a text editor and needs no
// JSON library to write: a header line, then for each topic one line of
// numbering followed by its event payloads, one per line, exactly as they
// were sent (an event never holds a raw newline: the ingest splits on them).
//
//     {"progress_relay_state":1,"topics":2}
//     {"topic":"task:1","epoch":"k3x9-1","seq":17,"history":2,"newest":false}
//     {"seq":16,"topic":"task:1",...}
//     {"seq":17,"topic":"task:1",...}
//     {"topic":"task:2","epoch":"k3x9-2","seq":3,"history":0,"newest":true}
//     {"seq":3,"topic":"task:2",...}
//
// `newest` is written only when history is empty (`--history 0`); otherwise
// the newest event is the last history line.

import NIOCore

/// One topic as the state file keeps it. Payloads are event JSON without frame headers.
public struct TopicState: Sendable, Equatable {
    public var name: String
    public var epoch: String
    public var seq: UInt64
    public var history: [ByteBuffer]
    public var newest: ByteBuffer?

    public init(name: String, epoch: String, seq: UInt64, history: [ByteBuffer], newest: ByteBuffer?) {
        self.name = name
        self.epoch = epoch
        self.seq = seq
        self.history = history
        self.newest = newest
    }
}

public enum StateFileError: Error, Equatable, CustomStringConvertible {
    case malformed(line: Int)

    public var description: String {
        switch self {
        case .malformed(let line): return "state file is malformed at line \(line)"
        }
    }
}

public enum StateFile {
    /// The file's bytes for `topics`.
    public static func encode(_ topics: [TopicState]) -> ByteBuffer {
        var out = ByteBuffer()
        out.writeString("{\"progress_relay_state\":1,\"topics\":\(topics.count)}\n")
        for topic in topics {
            let newestOnly = topic.history.isEmpty && topic.newest != nil
            out.writeString(
                "{\"topic\":\"\(topic.name)\",\"epoch\":\"\(topic.epoch)\",\"seq\":\(topic.seq),"
                    + "\"history\":\(topic.history.count),\"newest\":\(newestOnly)}\n")
            for payload in topic.history {
                out.writeImmutableBuffer(payload)
                out.writeInteger(UInt8(ascii: "\n"))
            }
            if newestOnly, let newest = topic.newest {
                out.writeImmutableBuffer(newest)
                out.writeInteger(UInt8(ascii: "\n"))
            }
        }
        return out
    }

    /// Reads back what `encode` wrote; any damage fails the whole file, so a
    /// half-written state never passes for a whole one.
    public static func decode(_ bytes: ByteBuffer) throws -> [TopicState] {
        // Every line ends with a newline: a file cut short anywhere fails here.
        guard bytes.readableBytesView.last == UInt8(ascii: "\n") else {
            throw StateFileError.malformed(line: bytes.readableBytesView.filter { $0 == UInt8(ascii: "\n") }.count + 1)
        }
        var lines = bytes.readableBytesView.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
            .map { Array($0) }
        lines.removeLast()
        guard let header = lines.first, let count = integer(in: header, key: "topics"), count >= 0,
            integer(in: header, key: "progress_relay_state") == 1
        else { throw StateFileError.malformed(line: 1) }

        var topics = [TopicState]()
        var index = 1
        for _ in 0..<count {
            guard index < lines.count else { throw StateFileError.malformed(line: index + 1) }
            let line = lines[index]
            guard let name = string(in: line, key: "topic"), let epoch = string(in: line, key: "epoch"),
                let seq = integer(in: line, key: "seq"), let history = integer(in: line, key: "history"),
                seq >= 1, history >= 0, history <= seq, history < lines.count - index
            else { throw StateFileError.malformed(line: index + 1) }
            let newestOnly = line.containsSubsequence(Array("\"newest\":true".utf8))
            index += 1
            let payloads = lines[index..<(index + history)].map { ByteBuffer(bytes: $0) }
            index += history
            var newest = payloads.last
            if newestOnly {
                guard index < lines.count else { throw StateFileError.malformed(line: index + 1) }
                newest = ByteBuffer(bytes: lines[index])
                index += 1
            }
            topics.append(TopicState(name: name, epoch: epoch, seq: UInt64(seq), history: payloads, newest: newest))
        }
        return topics
    }

    // The header lines hold only plain keys, topic-charset strings and integers,
    // so a key lookup is enough; a real JSON parser would be heavier than the job.
    private static func value(in line: [UInt8], key: String) -> ArraySlice<UInt8>? {
        let needle = Array("\"\(key)\":".utf8)
        guard let start = line.firstRange(of: needle)?.upperBound else { return nil }
        var end = start
        while end < line.count, line[end] != UInt8(ascii: ","), line[end] != UInt8(ascii: "}") { end += 1 }
        return line[start..<end]
    }

    private static func integer(in line: [UInt8], key: String) -> Int? {
        value(in: line, key: key).flatMap { Int(String(decoding: $0, as: UTF8.self)) }
    }

    private static func string(in line: [UInt8], key: String) -> String? {
        guard let raw = value(in: line, key: key), raw.count >= 2, raw.first == UInt8(ascii: "\""),
            raw.last == UInt8(ascii: "\"")
        else { return nil }
        return String(decoding: raw.dropFirst().dropLast(), as: UTF8.self)
    }
}

extension Array where Element == UInt8 {
    fileprivate func containsSubsequence(_ needle: [UInt8]) -> Bool { firstRange(of: needle) != nil }
}
