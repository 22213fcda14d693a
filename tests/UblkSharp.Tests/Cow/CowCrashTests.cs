using System.Buffers.Binary;
using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Targets.Cow;

namespace UblkSharp.Tests.Cow;

/// <summary>
/// An in-memory file that logs every write, punch and sync, so that a test can rebuild what a
/// crash after any number of operations could leave on disk: everything up to the last completed
/// sync, plus any subset of the later writes, each torn at sector granularity (the power-loss
/// model; a killed process is the case where every issued write survives).
/// </summary>
internal sealed class RecordingStorage : CowStorage
{
    private readonly Lock _lock = new();
    private byte[] _data;
    private long _length;

    public RecordingStorage(byte[] initial)
    {
        _data = (byte[])initial.Clone();
        _length = initial.Length;
    }

    public List<Op> Log { get; } = [];

    /// <summary>Operations up to this count succeed; from then on every call fails with EIO, as if the process had died.</summary>
    public int FailAfter { get; set; } = int.MaxValue;

    public readonly record struct Op(char Kind, long Offset, byte[]? Data, long Length);

    public override long Length => _length;

    public override int Read(Span<byte> buffer, long offset)
    {
        lock (_lock)
        {
            if (offset >= _length)
            {
                return 0;
            }
            var n = (int)Math.Min(buffer.Length, _length - offset);
            _data.AsSpan((int)offset, n).CopyTo(buffer);
            return n;
        }
    }

    public override int Write(ReadOnlySpan<byte> data, long offset)
    {
        lock (_lock)
        {
            if (Log.Count >= FailAfter)
            {
                return -Errno.EIO;
            }
            Log.Add(new Op('W', offset, data.ToArray(), data.Length));
            Apply(ref _data, ref _length, Log[^1], 0, data.Length);
            return 0;
        }
    }

    public override int Sync()
    {
        lock (_lock)
        {
            if (Log.Count >= FailAfter)
            {
                return -Errno.EIO;
            }
            Log.Add(new Op('S', 0, null, 0));
            return 0;
        }
    }

    public override int Fallocate(FallocateMode mode, long offset, long length)
    {
        lock (_lock)
        {
            if (Log.Count >= FailAfter)
            {
                return -Errno.EIO;
            }
            Log.Add(new Op('Z', offset, null, length));
            Apply(ref _data, ref _length, Log[^1], 0, length);
            return 0;
        }
    }

    private static void Apply(ref byte[] data, ref long length, Op op, long from, long to)
    {
        var end = op.Offset + to;
        if (end > data.Length)
        {
            Array.Resize(ref data, (int)Math.Max(end, data.Length * 2L));
        }
        if (op.Kind == 'W')
        {
            op.Data.AsSpan((int)from, (int)(to - from)).CopyTo(data.AsSpan((int)(op.Offset + from)));
            length = Math.Max(length, end);
        }
        else
        {
            // KEEP_SIZE: zeros within the file, nothing past its end.
            var zEnd = Math.Min(end, length);
            if (zEnd > op.Offset + from)
            {
                data.AsSpan((int)(op.Offset + from), (int)(zEnd - op.Offset - from)).Clear();
            }
        }
    }

    /// <summary>
    /// The file as a crash after the first <paramref name="ops"/> logged operations could leave it:
    /// all of them up to the last sync among them, then each later write's sectors kept or lost
    /// by <paramref name="rng"/> (null keeps them all).
    /// </summary>
    public static byte[] CrashImage(byte[] initial, List<Op> log, int ops, Random? rng)
    {
        var data = (byte[])initial.Clone();
        var length = (long)initial.Length;
        var lastSync = ops == 0 ? -1 : log.FindLastIndex(ops - 1, ops, o => o.Kind == 'S');
        for (var i = 0; i < ops; i++)
        {
            var op = log[i];
            if (op.Kind == 'S')
            {
                continue;
            }
            if (i < lastSync || rng is null)
            {
                Apply(ref data, ref length, op, 0, op.Length);
                continue;
            }
            for (long piece = 0; piece < op.Length; piece += 512)
            {
                if (rng.Next(2) == 0)
                {
                    Apply(ref data, ref length, op, piece, Math.Min(op.Length, piece + 512));
                }
            }
        }
        return data[..(int)length];
    }
}

public class CowCrashTests
{
    private const int Sectors = 96;
    private const int SectorSize = 512;

    /// <summary>A sector's content that names the write (0 = the backing file) and the sector.</summary>
    private static byte[] Content(int writeId, int sector)
    {
        var b = new byte[SectorSize];
        for (var i = 0; i < SectorSize; i += 8)
        {
            BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(i), writeId + 1);
            BinaryPrimitives.WriteInt32LittleEndian(b.AsSpan(i + 4), sector ^ 0x5a5a);
        }
        return b;
    }

    /// <summary>Which write a sector's content came from: -1 for zeros, -2 for anything else (garbage).</summary>
    private static int Identify(ReadOnlySpan<byte> sector, int s)
    {
        if (!sector.ContainsAnyExcept((byte)0))
        {
            return -1;
        }
        var id = BinaryPrimitives.ReadInt32LittleEndian(sector) - 1;
        return id >= 0 && sector.SequenceEqual(Content(id, s)) ? id : -2;
    }

    private sealed record Event(char Kind, int Id, int First, int Count, int LogStart, int LogEnd);

    [Fact]
    public void EveryCrashPointLeavesOldOrNewDataAndNoBitOverUnwrittenData()
    {
        var header = CowHeader.Create("/backing", 1, Sectors * SectorSize, SectorSize, 512);
        var backingBytes = new byte[Sectors * SectorSize];
        for (var s = 0; s < Sectors; s++)
        {
            Content(0, s).CopyTo(backingBytes, s * SectorSize);
        }
        var cowInitial = new byte[header.DataOffset + header.Size];
        header.ToBytes().CopyTo(cowInitial, 0);

        // The workload, run once with every storage operation logged.
        var cow = new RecordingStorage(cowInitial);
        var events = new List<Event>();
        var rng = new Random(1234);
        var target = new CowTarget(cow, new RecordingStorage(backingBytes), header, "/crash.cow", "/backing", new CowOpenOptions { BitmapWriteback = TimeSpan.Zero });
        for (var id = 1; id <= 150; id++)
        {
            var count = rng.Next(1, 9);
            var first = rng.Next(Sectors - count);
            var start = cow.Log.Count;
            var kind = rng.Next(12) switch { 0 => 'F', 1 => 'Z', 2 => 'B', _ => 'W' };
            switch (kind)
            {
                case 'W':
                    var data = new byte[count * SectorSize];
                    for (var i = 0; i < count; i++)
                    {
                        Content(id, first + i).CopyTo(data, i * SectorSize);
                    }
                    Assert.Equal(data.Length, target.Write(data, first * (long)SectorSize));
                    break;
                case 'Z':
                    Assert.Equal(0, target.WriteZeroes(first * (long)SectorSize, count * (long)SectorSize, mayUnmap: true));
                    break;
                case 'F':
                    Assert.Equal(0, target.Flush());
                    break;
                default:
                    Assert.Equal(0, target.WriteBackBitmap());
                    break;
            }
            events.Add(new Event(kind, id, first, count, start, cow.Log.Count));
        }
        target.Dispose();
        var log = cow.Log;
        Assert.Contains(log, o => o.Kind == 'S');

        var checkedImages = 0;
        for (var crashAt = 0; crashAt <= log.Count; crashAt++)
        {
            // What each sector may read: the backing data, or any write to it that began before the crash
            // (zeros for write-zeroes); a flush that completed before the crash rules out older values.
            var allowed = new List<int>[Sectors];
            for (var s = 0; s < Sectors; s++)
            {
                allowed[s] = [0];
            }
            foreach (var e in events.Where(e => e.LogStart < crashAt))
            {
                if (e.Kind is 'W' or 'Z')
                {
                    for (var s = e.First; s < e.First + e.Count; s++)
                    {
                        allowed[s].Add(e.Kind == 'W' ? e.Id : -1);
                    }
                }
                else if (e.Kind == 'F' && e.LogEnd <= crashAt)
                {
                    // Everything that completed before this flush began is durable.
                    for (var s = 0; s < Sectors; s++)
                    {
                        var last = events.LastOrDefault(w => w.Kind is 'W' or 'Z' && w.LogEnd <= e.LogStart && w.Id < e.Id && s >= w.First && s < w.First + w.Count);
                        if (last is not null)
                        {
                            var keepFrom = allowed[s].IndexOf(last.Kind == 'W' ? last.Id : -1);
                            allowed[s] = allowed[s].Skip(keepFrom).ToList();
                        }
                    }
                }
            }

            var trials = new List<Random?> { null };
            for (var t = 0; t < 6; t++)
            {
                trials.Add(new Random((crashAt * 31) + t));
            }
            foreach (var trial in trials)
            {
                var image = RecordingStorage.CrashImage(cowInitial, log, crashAt, trial);
                var cowAfter = new RecordingStorage(image);
                var h = CowHeader.Parse(image.AsSpan(0, CowHeader.MaxSize), "crash");
                using var reopened = new CowTarget(cowAfter, new RecordingStorage(backingBytes), h, "/crash.cow", "/backing", new CowOpenOptions { ReadOnly = true });
                var all = new byte[Sectors * SectorSize];
                Assert.Equal(all.Length, reopened.Read(all, 0));
                for (var s = 0; s < Sectors; s++)
                {
                    var id = Identify(all.AsSpan(s * SectorSize, SectorSize), s);
                    Assert.True(id != -2, $"crash after {crashAt} ops ({(trial is null ? "all writes kept" : "torn")}): sector {s} reads garbage (bit {reopened.IsInCow(s)})");
                    Assert.True(allowed[s].Contains(id), $"crash after {crashAt} ops ({(trial is null ? "all writes kept" : "torn")}): sector {s} reads write {id}, allowed [{string.Join(", ", allowed[s])}] (bit {reopened.IsInCow(s)})");
                }
                checkedImages++;
            }
        }
        Assert.True(checkedImages > 500, $"{checkedImages} crash images");
    }

    [Fact]
    public void AFailedWriteOrFlushLeavesADiskThatStillReadsOldOrNew()
    {
        // The process "dies" at each operation in turn: from then on every storage call fails.
        var header = CowHeader.Create("/backing", 1, Sectors * SectorSize, SectorSize, 512);
        var backingBytes = new byte[Sectors * SectorSize];
        for (var s = 0; s < Sectors; s++)
        {
            Content(0, s).CopyTo(backingBytes, s * SectorSize);
        }
        var cowInitial = new byte[header.DataOffset + header.Size];
        header.ToBytes().CopyTo(cowInitial, 0);
        for (var failAt = 0; failAt < 40; failAt++)
        {
            var cow = new RecordingStorage(cowInitial) { FailAfter = failAt };
            var target = new CowTarget(cow, new RecordingStorage(backingBytes), header, "/c", "/backing", new CowOpenOptions { BitmapWriteback = TimeSpan.Zero });
            var written = new List<int>[Sectors];
            for (var s = 0; s < Sectors; s++)
            {
                written[s] = [0];
            }
            var rng = new Random(failAt);
            for (var id = 1; id < 30; id++)
            {
                var first = rng.Next(Sectors - 4);
                var data = new byte[4 * SectorSize];
                for (var i = 0; i < 4; i++)
                {
                    Content(id, first + i).CopyTo(data, i * SectorSize);
                    written[first + i].Add(id);
                }
                _ = target.Write(data, first * (long)SectorSize);
                if (id % 5 == 0)
                {
                    _ = target.Flush();
                }
            }
            try
            {
                target.Dispose();
            }
            catch (IOException)
            {
                // The final flush fails too: the process is "dead".
            }
            var image = RecordingStorage.CrashImage(cowInitial, cow.Log, cow.Log.Count, null);
            using var reopened = new CowTarget(new RecordingStorage(image), new RecordingStorage(backingBytes), header, "/c", "/backing", new CowOpenOptions { ReadOnly = true });
            var all = new byte[Sectors * SectorSize];
            Assert.Equal(all.Length, reopened.Read(all, 0));
            for (var s = 0; s < Sectors; s++)
            {
                var id = Identify(all.AsSpan(s * SectorSize, SectorSize), s);
                Assert.True(written[s].Contains(id), $"fail at op {failAt}: sector {s} reads {id}");
            }
        }
    }
}
