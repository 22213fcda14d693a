using System.Security.Cryptography;
using System.Text.Json;
using UblkSharp.Nbd;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Nbd;

/// <summary>Our server against Debian's real NBD clients: libnbd's tools, qemu's, fio's nbd engine.</summary>
public class NbdInteropTests
{
    [Fact]
    public void NbdinfoDescribesTheExport()
    {
        using var s = new TestServer(new MemoryTarget(64 << 20), "disk");
        using var json = JsonDocument.Parse(Tools.Ok("nbdinfo", "--json", s.Uri));
        var e = json.RootElement.GetProperty("exports")[0];
        Assert.True(json.RootElement.GetProperty("structured").GetBoolean());
        Assert.Equal("newstyle-fixed", json.RootElement.GetProperty("protocol").GetString());
        Assert.Equal("disk", e.GetProperty("export-name").GetString());
        Assert.Equal("test export", e.GetProperty("description").GetString());
        Assert.Equal(64L << 20, e.GetProperty("export-size").GetInt64());
        foreach (var can in new[] { "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_multi_conn", "can_df" })
        {
            Assert.True(e.GetProperty(can).GetBoolean(), can);
        }
        Assert.False(e.GetProperty("is_read_only").GetBoolean());
        Assert.Equal(512, e.GetProperty("block_size_minimum").GetInt32());
        Assert.Equal(4096, e.GetProperty("block_size_preferred").GetInt32());
        Assert.Equal(32 << 20, e.GetProperty("block_size_maximum").GetInt32());
        Assert.Contains("base:allocation", e.GetProperty("contexts").EnumerateArray().Select(c => c.GetString()));

        var list = Tools.Ok("nbdinfo", "--list", "--json", s.Uri);
        using var listed = JsonDocument.Parse(list);
        Assert.Equal("disk", listed.RootElement.GetProperty("exports")[0].GetProperty("export-name").GetString());
    }

    [Fact]
    public void ReadOnlyExportRefusesWritesAndSaysSo()
    {
        using var s = new TestServer(new MemoryTarget(8 << 20), readOnly: true);
        using var json = JsonDocument.Parse(Tools.Ok("nbdinfo", "--json", s.Uri));
        var e = json.RootElement.GetProperty("exports")[0];
        Assert.True(e.GetProperty("is_read_only").GetBoolean());
        Assert.False(e.GetProperty("can_trim").GetBoolean());
        Assert.False(e.GetProperty("can_zero").GetBoolean());
        var output = Tools.Nbdsh(s.Uri, """
            try:
                h.pwrite(b'x' * 512, 0)
                print('WROTE')
            except nbd.Error as ex:
                print('ERRNO', ex.errno)
            """);
        Assert.Contains("ERRNO EPERM", output);
    }

    [Fact]
    public void QemuImgConvertsInAndOutAndCompares()
    {
        const long size = 48L << 20;
        using var s = new TestServer(LoopOn(out var backing, size));
        var source = s.TempPath("source.img");
        WriteSparseRandom(source, size, seed: 5);
        // Into the export (-n: it exists), then compare, then out again and compare.
        Tools.OkWithin(TimeSpan.FromMinutes(2), "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, s.Uri);
        Assert.Contains("identical", Tools.Ok("qemu-img", "compare", "-f", "raw", "-F", "raw", source, s.Uri));
        var copy = s.TempPath("copy.img");
        Tools.OkWithin(TimeSpan.FromMinutes(2), "qemu-img", "convert", "-f", "raw", "-O", "raw", s.Uri, copy);
        Assert.Contains("identical", Tools.Ok("qemu-img", "compare", "-f", "raw", "-F", "raw", source, copy));
        Assert.Equal(Sha(source), Sha(backing));
        File.Delete(backing);
    }

    [Fact]
    public void QemuIoPatternsRoundTrip()
    {
        using var s = new TestServer(new MemoryTarget(32 << 20));
        var output = Tools.Ok("qemu-io", "-f", "raw",
            "-c", "write -P 0xab 0 64k",
            "-c", "read -P 0xab 0 64k",
            "-c", "write -z 64k 64k",
            "-c", "read -P 0 64k 64k",
            "-c", "write -f -P 0x5a 1M 128k",
            "-c", "read -P 0x5a 1M 128k",
            "-c", "discard 2M 1M",
            "-c", "flush",
            "-c", "aio_write -P 0x11 4M 4k",
            "-c", "aio_write -P 0x22 8M 512k",
            "-c", "aio_flush",
            "-c", "read -P 0x11 4M 4k",
            "-c", "read -P 0x22 8M 512k",
            "-c", "write -P 0x33 31M 1M",
            "-c", "read -P 0x33 31M 1M",
            s.Uri);
        Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
        Assert.Equal(6, output.Split('\n').Count(l => l.StartsWith("read ", StringComparison.Ordinal)));
    }

    [Fact]
    public void NbdinfoMapShowsTheHolesOfALoopFile()
    {
        const long size = 16L << 20;
        using var s = new TestServer(LoopOn(out var backing, size, data: [(1 << 20, 1 << 20), (8 << 20, 64 << 10)]));
        var map = Tools.Ok("nbdinfo", "--map", "--json", s.Uri);
        using var json = JsonDocument.Parse(map);
        var extents = json.RootElement.EnumerateArray()
            .Select(x => (Offset: x.GetProperty("offset").GetInt64(), Length: x.GetProperty("length").GetInt64(), Type: x.GetProperty("type").GetInt32()))
            .ToList();
        Assert.Equal(
            [(0L, 1L << 20, 3), (1L << 20, 1L << 20, 0), (2L << 20, 6L << 20, 3), (8L << 20, 64L << 10, 0), ((8L << 20) + (64 << 10), size - (8L << 20) - (64 << 10), 3)],
            extents);
        // A trim makes a hole, a write fills one: the map follows.
        Tools.Ok("qemu-io", "-f", "raw", "-c", "discard 1M 1M", "-c", "write -P 1 12M 4k", s.Uri);
        using var after = JsonDocument.Parse(Tools.Ok("nbdinfo", "--map", "--json", s.Uri));
        var data = after.RootElement.EnumerateArray().Where(x => x.GetProperty("type").GetInt32() == 0)
            .Select(x => x.GetProperty("offset").GetInt64()).ToList();
        Assert.Equal([8L << 20, 12L << 20], data);
        File.Delete(backing);
    }

    [Fact]
    public void NbdcopyRoundTripKeepsTheChecksum()
    {
        const long size = 40L << 20;
        using var s = new TestServer(new MemoryTarget(size));
        var source = s.TempPath("in.img");
        WriteSparseRandom(source, size, seed: 9);
        Tools.OkWithin(TimeSpan.FromMinutes(2), "nbdcopy", "--flush", source, s.Uri);
        var copy = s.TempPath("out.img");
        Tools.OkWithin(TimeSpan.FromMinutes(2), "nbdcopy", s.Uri, copy);
        Assert.Equal(Sha(source), Sha(copy));
        // nbdcopy uses several connections when the server allows multi-conn.
        Assert.True(s.Server.ConnectionsAccepted >= 3, $"{s.Server.ConnectionsAccepted} connections");
    }

    [Fact]
    public void FioNbdEngineVerifiesOverFourConnections()
    {
        using var s = new TestServer(new MemoryTarget(64 << 20), options: new NbdServerOptions { Execution = NbdExecution.Workers });
        var output = Tools.OkWithin(TimeSpan.FromMinutes(3), "fio", "--name=verify", "--ioengine=nbd", $"--uri={s.Uri}",
            "--rw=randwrite", "--bs=4k", "--bsrange=4k-64k", "--iodepth=16", "--numjobs=4", "--size=8M", "--offset_increment=16M",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting");
        Assert.Contains("verify", output, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("verify: bad", output, StringComparison.OrdinalIgnoreCase);
        Assert.True(s.Server.ConnectionsAccepted >= 4);
        Assert.Equal(0, s.Server.InternalErrors);
    }

    [Fact]
    public void NbdshCommandsBehaveAsTheProtocolSays()
    {
        using var s = new TestServer(new MemoryTarget(16 << 20));
        var output = Tools.Nbdsh(s.Uri, """
            h.pwrite(b'\xaa' * 65536, 0, nbd.CMD_FLAG_FUA)
            assert h.pread(65536, 0) == b'\xaa' * 65536
            h.cache(65536, 0)
            h.flush()
            h.zero(4096, 4096, nbd.CMD_FLAG_FAST_ZERO)
            assert h.pread(4096, 4096) == bytes(4096)
            h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
            h.trim(65536, 1 << 20)
            seen = []
            def cb(meta, offset, entries, err):
                seen.append((meta, list(entries)))
            h.block_status(1 << 20, 0, cb)
            assert seen[0][0] == 'base:allocation', seen
            assert sum(seen[0][1][0::2]) <= 1 << 20, seen
            buf = h.pread(4096, (16 << 20) - 4096)
            assert len(buf) == 4096
            try:
                h.pread(512, 16 << 20)
                print('READ PAST END')
            except nbd.Error as ex:
                print('past end:', ex.errno)
            print('OK')
            """);
        Assert.Contains("OK", output);
        Assert.Contains("past end: EINVAL", output);
    }

    [Fact]
    public void FastZeroIsRefusedWhereZeroingIsSlow()
    {
        using var s = new TestServer(new WriteOnlyByWritesTarget(8 << 20));
        Assert.False(s.Export.CanFastZero);
        var output = Tools.Nbdsh(s.Uri, """
            h.zero(4096, 0)
            try:
                h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
                print('ZEROED')
            except nbd.Error as ex:
                print('fast zero:', ex.errno)
            """);
        Assert.Contains("fast zero: ENOTSUP", output);
    }

    [Fact]
    public void OldClientsWithoutStructuredRepliesWork()
    {
        using var s = new TestServer(new MemoryTarget(8 << 20));
        var output = Tools.Nbdsh(s.Uri, """
            assert not h.get_structured_replies_negotiated()
            h.pwrite(b'\x01' * 8192, 4096)
            assert h.pread(8192, 4096) == b'\x01' * 8192
            try:
                h.pread(512, 8 << 20)
            except nbd.Error as ex:
                print('past end:', ex.errno)
            print('OK')
            """, structured: false);
        Assert.Contains("OK", output);
        Assert.Contains("past end: EINVAL", output);
    }

    [Fact]
    public void ServesOverTcpOnLoopback()
    {
        using var s = new TestServer(new MemoryTarget(8 << 20), "tcp", tcp: true);
        Assert.StartsWith("nbd://127.0.0.1:", s.Uri, StringComparison.Ordinal);
        var output = Tools.Ok("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "read -P 0x42 0 1M", s.Uri);
        Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
    }

    // ---- helpers ----

    /// <summary>A loop target over a new sparse file in /tmp (data ranges filled with random bytes).</summary>
    internal static LoopTarget LoopOn(out string path, long size, (long Offset, int Length)[]? data = null)
    {
        path = Path.Combine(Path.GetTempPath(), $"ublksharp-nbd-loop-{Guid.NewGuid():N}.img");
        using (var f = new FileStream(path, FileMode.CreateNew, FileAccess.Write))
        {
            f.SetLength(size);
            var rng = new Random(3);
            foreach (var (offset, length) in data ?? [])
            {
                var b = new byte[length];
                rng.NextBytes(b);
                f.Position = offset;
                f.Write(b);
            }
        }
        return new LoopTarget(path);
    }

    /// <summary>A file with random 1 MiB chunks, zero chunks and holes.</summary>
    internal static void WriteSparseRandom(string path, long size, int seed)
    {
        var rng = new Random(seed);
        using var f = new FileStream(path, FileMode.Create, FileAccess.Write);
        f.SetLength(size);
        var chunk = new byte[1 << 20];
        for (long off = 0; off < size; off += chunk.Length)
        {
            switch (rng.Next(3))
            {
                case 0:
                    rng.NextBytes(chunk);
                    chunk[rng.Next(chunk.Length)] = 0;
                    f.Position = off;
                    f.Write(chunk);
                    break;
                case 1:
                    Array.Clear(chunk);
                    f.Position = off;
                    f.Write(chunk);
                    break;
                default:
                    break; // hole
            }
        }
    }

    internal static string Sha(string path)
    {
        using var f = File.OpenRead(path);
        return Convert.ToHexString(SHA256.HashData(f));
    }

    /// <summary>A writable target with no write-zeroes of its own: zeroing means writing zeros.</summary>
    internal sealed class WriteOnlyByWritesTarget(long size) : BlockTarget
    {
        private readonly byte[] _data = new byte[size];

        public override long Size => _data.Length;

        public override string Kind => "test";

        public override int Read(Span<byte> buffer, long offset)
        {
            _data.AsSpan((int)offset, buffer.Length).CopyTo(buffer);
            return buffer.Length;
        }

        public override int Write(ReadOnlySpan<byte> data, long offset)
        {
            data.CopyTo(_data.AsSpan((int)offset));
            return data.Length;
        }
    }
}
