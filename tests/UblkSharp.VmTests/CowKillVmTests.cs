using System.Buffers.Binary;
using System.Diagnostics;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using UblkSharp.Interop;
using UblkSharp.Targets.Cow;

namespace UblkSharp.VmTests;

/// <summary>kill -9 of the daemon during writes: the overlay reopens with old or new data everywhere.</summary>
public sealed class CowKillVmTests : CowVmTest
{
    /// <summary>A sector's content that names its write and its sector, so any read can be judged alone.</summary>
    private static void Fill(Span<byte> sector, int writeId, long s)
    {
        for (var i = 0; i < 512; i += 16)
        {
            BinaryPrimitives.WriteInt32LittleEndian(sector[i..], writeId);
            BinaryPrimitives.WriteInt64LittleEndian(sector[(i + 4)..], s);
            BinaryPrimitives.WriteInt32LittleEndian(sector[(i + 12)..], writeId ^ 0x3c3c3c3c);
        }
    }

    private static int WriteIdOf(ReadOnlySpan<byte> sector, long s)
    {
        var id = BinaryPrimitives.ReadInt32LittleEndian(sector);
        Span<byte> want = stackalloc byte[512];
        Fill(want, id, s);
        return id > 0 && sector.SequenceEqual(want) ? id : -1;
    }

    [Fact]
    public unsafe void KillDashNineDuringWritesLeavesOldOrNewDataEverywhere()
    {
        VmEnvironment.RequireDriver();
        const int sectors = (32 << 20) / 512;
        const int writers = 4;
        const int region = sectors / writers;
        var baseImg = RandomFile("base.img", sectors * 512L, 23);
        var over = F("over.cow");
        Assert.Equal(0, VmEnvironment.RunCli($"cow create {over} --backing {baseImg}").ExitCode);

        // The daemon in the foreground, as our child, so that it can be killed outright.
        var psi = new ProcessStartInfo(VmEnvironment.Cli) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { "add", "-t", "cow", "-f", over, "--io", "ring", "-q", "2", "-d", "32", "--foreground" })
        {
            psi.ArgumentList.Add(a);
        }
        using var daemon = Process.Start(psi)!;
        var log = new System.Text.StringBuilder();
        daemon.ErrorDataReceived += (_, e) =>
        {
            lock (log)
            {
                log.AppendLine(e.Data);
            }
        };
        daemon.BeginErrorReadLine();
        string? line = null;
        var reader = new Thread(() => line = daemon.StandardOutput.ReadLine()) { IsBackground = true };
        reader.Start();
        Assert.True(reader.Join(TimeSpan.FromSeconds(120)), "the daemon did not report its device");
        string Log()
        {
            lock (log)
            {
                return log.ToString();
            }
        }
        var dev = line ?? "";
        Assert.True(dev.StartsWith("/dev/ublkb", StringComparison.Ordinal), $"daemon said '{dev}': {Log()}");
        var id = uint.Parse(dev["/dev/ublkb".Length..], System.Globalization.CultureInfo.InvariantCulture);

        // Each writer owns a region, writes runs of sectors with fresh ids and fsyncs now and then;
        // after each fsync that succeeds it records the ids its region had (they must survive).
        var nextId = 0;
        var flushes = 0;
        var flushed = new int[sectors];
        var stop = 0;
        var threads = Enumerable.Range(0, writers).Select(w => new Thread(() =>
        {
            var fd = Libc.OpenOrThrow(dev, Libc.O_RDWR | Libc.O_DIRECT);
            using var handle = new SafeFileHandle(fd, ownsHandle: true);
            var buf = (byte*)NativeMemory.AlignedAlloc(64 * 512, 4096);
            var rng = new Random(w);
            var mine = new int[region];
            try
            {
                for (var n = 0; Volatile.Read(ref stop) == 0; n++)
                {
                    var count = rng.Next(1, 65);
                    var first = rng.Next(region - count);
                    var wid = Interlocked.Increment(ref nextId);
                    var span = new Span<byte>(buf, count * 512);
                    for (var i = 0; i < count; i++)
                    {
                        Fill(span.Slice(i * 512, 512), wid, (w * region) + first + i);
                    }
                    RandomAccess.Write(handle, span, ((w * region) + first) * 512L);
                    for (var i = 0; i < count; i++)
                    {
                        mine[first + i] = wid;
                    }
                    if (n % 8 == 7)
                    {
                        if (fsync(fd) != 0)
                        {
                            break;
                        }
                        mine.CopyTo(flushed, w * region);
                        Interlocked.Increment(ref flushes);
                    }
                }
            }
            catch (IOException)
            {
                // The daemon is gone: the device fails IO from now on.
            }
            finally
            {
                NativeMemory.AlignedFree(buf);
            }
        })).ToArray();
        foreach (var t in threads)
        {
            t.Start();
        }
        Thread.Sleep(TimeSpan.FromSeconds(4));
        Assert.False(daemon.HasExited, Log());
        daemon.Kill(); // SIGKILL: no flush, no cleanup
        Volatile.Write(ref stop, 1);
        Assert.True(daemon.WaitForExit(30_000));
        foreach (var t in threads)
        {
            Assert.True(t.Join(TimeSpan.FromSeconds(120)), "a writer hung on the dead device");
        }
        var (code, output) = VmEnvironment.RunCli($"del -n {id}");
        Assert.True(code == 0, $"del after the kill: {output}");
        Assert.True(nextId > writers * 4, $"only {nextId} writes before the kill");

        // No recovery: the overlay reopens as it was left. Every sector is its old data (the base)
        // or data some write put there; where the bitmap says "COW", never unwritten space.
        var baseBytes = File.ReadAllBytes(baseImg);
        using var target = new CowTarget(over, new CowOpenOptions { ReadOnly = true });
        var all = new byte[target.Size];
        Assert.Equal(all.Length, target.Read(all, 0));
        int inCow = 0, newData = 0;
        var bad = new List<string>();
        for (var s = 0; s < sectors; s++)
        {
            var sector = all.AsSpan(s * 512, 512);
            var isOld = sector.SequenceEqual(baseBytes.AsSpan(s * 512, 512));
            var wid = isOld ? 0 : WriteIdOf(sector, s);
            var bit = target.IsInCow(s);
            if (wid < 0)
            {
                bad.Add($"sector {s} is neither its old data nor any write's (bit {bit})");
            }
            else if (bit && wid == 0)
            {
                bad.Add($"sector {s}: the bitmap points at data no write put there");
            }
            else if (wid > nextId)
            {
                bad.Add($"sector {s}: write {wid} was never issued");
            }
            else if (wid < flushed[s])
            {
                bad.Add($"sector {s} reads write {wid} (bit {bit}), older than write {flushed[s]}, which a completed flush made durable");
            }
            inCow += bit ? 1 : 0;
            newData += wid > 0 ? 1 : 0;
        }
        var summary = $"kill -9 after {nextId} writes, {flushes} flushes: {inCow} sectors in the COW file, {newData} with new data";
        Console.WriteLine(summary);
        Assert.True(bad.Count == 0, $"{summary}; {bad.Count} bad sectors:\n{string.Join('\n', bad.Take(20))}");
        Assert.True(newData > 0);
    }
}
