using System.Buffers.Binary;
using System.Text;
using Microsoft.Win32.SafeHandles;

namespace UblkSharp.Targets.Qcow2;

/// <summary>
/// One entry of a qcow2 image's internal snapshot table: its own L1 table (the guest's disk as it
/// was), id, name, time and disk size. Serving a snapshot is reading through that L1 table.
/// </summary>
public sealed record Qcow2Snapshot
{
    /// <summary>Bytes of an entry before its extra data.</summary>
    private const int FixedLength = 40;

    /// <summary>qemu's bound on an entry's extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA).</summary>
    private const int MaxExtraData = 1024;

    /// <summary>qemu's bound on the whole table (QCOW_MAX_SNAPSHOTS_SIZE).</summary>
    private const long MaxTableBytes = 1024L * Qcow2Header.MaxSnapshots;

    public required string Id { get; init; }

    public required string Name { get; init; }

    public required long L1TableOffset { get; init; }

    public required int L1Size { get; init; }

    /// <summary>The guest disk's size when the snapshot was taken.</summary>
    public required long DiskSize { get; init; }

    public required DateTimeOffset Date { get; init; }

    /// <summary>Guest time when it was taken (nanoseconds the VM had run).</summary>
    public long VmClockNanoseconds { get; init; }

    /// <summary>Bytes of saved VM state (0 for a disk-only snapshot).</summary>
    public long VmStateSize { get; init; }

    /// <summary>Reads an image's snapshot table; every entry's L1 table is checked as the active one is.</summary>
    /// <exception cref="Qcow2FormatException">A table that runs outside the file or breaks a bound.</exception>
    internal static IReadOnlyList<Qcow2Snapshot> ReadTable(SafeFileHandle file, Qcow2Header header, long fileLength, string name)
    {
        var list = new List<Qcow2Snapshot>(header.SnapshotCount);
        var offset = header.SnapshotsOffset;
        var fixedPart = new byte[FixedLength];
        for (var i = 0; i < header.SnapshotCount; i++)
        {
            if (offset - header.SnapshotsOffset > MaxTableBytes)
            {
                throw new Qcow2FormatException(Qcow2Header.Fmt($"{name}: the snapshot table is larger than {MaxTableBytes} bytes"));
            }
            ReadExactly(file, fixedPart, offset, fileLength, name);
            var l1Offset = BinaryPrimitives.ReadUInt64BigEndian(fixedPart);
            var l1Size = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(8));
            int idLength = BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(12));
            int nameLength = BinaryPrimitives.ReadUInt16BigEndian(fixedPart.AsSpan(14));
            var seconds = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(16));
            var nanoseconds = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(20));
            var vmClock = BinaryPrimitives.ReadUInt64BigEndian(fixedPart.AsSpan(24));
            long vmState = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(32));
            var extraLength = BinaryPrimitives.ReadUInt32BigEndian(fixedPart.AsSpan(36));
            if (extraLength > MaxExtraData)
            {
                throw new Qcow2FormatException(Qcow2Header.Fmt($"{name}: snapshot {i} has {extraLength} bytes of extra data (at most {MaxExtraData})"));
            }
            var rest = new byte[extraLength + idLength + nameLength];
            ReadExactly(file, rest, offset + FixedLength, fileLength, name);
            var extra = rest.AsSpan(0, (int)extraLength);
            var diskSize = header.Size;
            if (extra.Length >= 8)
            {
                vmState = (long)Math.Min(BinaryPrimitives.ReadUInt64BigEndian(extra), (ulong)long.MaxValue);
            }
            if (extra.Length >= 16)
            {
                var d = BinaryPrimitives.ReadUInt64BigEndian(extra[8..]);
                if (d > 1UL << 56)
                {
                    throw new Qcow2FormatException(Qcow2Header.Fmt($"{name}: snapshot {i} has a disk size of {d} bytes"));
                }
                diskSize = (long)d;
            }
            if (l1Offset > long.MaxValue || l1Size > int.MaxValue)
            {
                throw new Qcow2FormatException(Qcow2Header.Fmt($"{name}: snapshot {i}'s L1 table ({l1Size} entries at {l1Offset}) is outside the file"));
            }
            var snapshot = new Qcow2Snapshot
            {
                L1TableOffset = (long)l1Offset,
                L1Size = (int)l1Size,
                Id = Encoding.UTF8.GetString(rest.AsSpan((int)extraLength, idLength)),
                Name = Encoding.UTF8.GetString(rest.AsSpan((int)extraLength + idLength, nameLength)),
                DiskSize = diskSize,
                Date = DateTimeOffset.FromUnixTimeSeconds(seconds).AddTicks(Math.Min(nanoseconds, 999_999_999u) / 100),
                VmClockNanoseconds = (long)Math.Min(vmClock, (ulong)long.MaxValue),
                VmStateSize = vmState,
            };
            header.CheckTable(snapshot.L1TableOffset, snapshot.L1Size, diskSize, fileLength, name, $"L1 table of snapshot '{snapshot.Name}'");
            list.Add(snapshot);
            offset += (FixedLength + rest.Length + 7) & ~7L;
        }
        return list;
    }

    /// <summary>The snapshot <paramref name="idOrName"/> names: an id first, then a name (as qemu looks them up).</summary>
    internal static Qcow2Snapshot? Find(IReadOnlyList<Qcow2Snapshot> snapshots, string idOrName)
        => snapshots.FirstOrDefault(s => s.Id == idOrName) ?? snapshots.FirstOrDefault(s => s.Name == idOrName);

    private static void ReadExactly(SafeFileHandle file, Span<byte> buffer, long offset, long fileLength, string name)
    {
        if (offset > fileLength || buffer.Length > fileLength - offset)
        {
            throw new Qcow2FormatException(Qcow2Header.Fmt($"{name}: the snapshot table runs past the end of the file"));
        }
        var done = 0;
        while (done < buffer.Length)
        {
            var n = RandomAccess.Read(file, buffer[done..], offset + done);
            if (n <= 0)
            {
                throw new Qcow2FormatException($"{name}: the snapshot table runs past the end of the file");
            }
            done += n;
        }
    }
}
