using System.Globalization;
using UblkSharp.Interop;

namespace UblkSharp.Runtime;

/// <summary>
/// The loop driver's autoclear for ublk: a device that has been mounted deletes itself once its
/// last mount is gone. The lesson of loop's autoclear races is that no opener may ever see a
/// half-torn device, so teardown goes in this order: remove the /dev node (new opens by path get
/// ENOENT, as for a device that no longer exists), wait until no process holds the device open,
/// and only then stop it.
/// </summary>
public sealed unsafe class Autoclear
{
    private readonly string _blockPath;
    private readonly string _devNumber;

    public Autoclear(string blockPath)
    {
        _blockPath = blockPath;
        // "259:3" from sysfs, as mountinfo writes it (the st_dev of ext4 and xfs; btrfs has its own).
        _devNumber = File.ReadAllText($"/sys/class/block/{Path.GetFileName(blockPath)}/dev").Trim();
    }

    /// <summary>
    /// Waits until the device has been mounted and then unmounted everywhere in this mount
    /// namespace. Returns false if <paramref name="stop"/> fired first.
    /// </summary>
    public bool WaitUntilReleased(Func<bool> stop)
    {
        ArgumentNullException.ThrowIfNull(stop);
        var fd = Libc.OpenOrThrow("/proc/self/mountinfo", Libc.O_RDONLY);
        try
        {
            var used = false;
            while (!stop())
            {
                var mounted = IsMounted();
                used |= mounted;
                if (used && !mounted)
                {
                    return true;
                }
                // The mount table reports POLLPRI|POLLERR once per change (poll itself re-arms it);
                // the timeout only lets us check stop().
                var p = new Libc.PollFd { fd = fd, events = Libc.POLLPRI };
                _ = Libc.poll(&p, 1, 250);
            }
            return false;
        }
        finally
        {
            _ = Libc.close(fd);
        }
    }

    private bool IsMounted() => IsMountedIn(File.ReadLines("/proc/self/mountinfo"), _blockPath, _devNumber);

    /// <summary>Whether any line of a mountinfo table mounts the device (by its source or its major:minor).</summary>
    internal static bool IsMountedIn(IEnumerable<string> mountinfo, string blockPath, string devNumber) =>
        mountinfo.Any(line => MountInfo.Parse(line) is { } mount && mount.IsOf(blockPath, devNumber));

    /// <summary>
    /// Makes the device unreachable by path and waits (bounded) until no process holds it open.
    /// Returns the number of openers still there at the deadline (0 when all went).
    /// </summary>
    public int Retire(TimeSpan timeout)
    {
        _ = Libc.unlink(_blockPath);
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        // Two clean scans apart: an open that had resolved the path just before the unlink
        // installs its fd a moment later.
        var clean = 0;
        while (true)
        {
            var openers = CountOpeners();
            clean = openers == 0 ? clean + 1 : 0;
            if (clean == 2)
            {
                return 0;
            }
            if (Environment.TickCount64 > deadline)
            {
                return openers;
            }
            Thread.Sleep(20);
        }
    }

    private int CountOpeners()
    {
        var n = 0;
        foreach (var proc in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(proc), NumberStyles.None, CultureInfo.InvariantCulture, out _))
            {
                continue;
            }
            try
            {
                foreach (var fd in Directory.EnumerateFileSystemEntries(proc + "/fd"))
                {
                    var target = new FileInfo(fd).LinkTarget;
                    if (target is not null && (target == _blockPath || target == _blockPath + " (deleted)"))
                    {
                        n++;
                    }
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // The process ended while we looked, or is not ours to inspect.
            }
        }
        return n;
    }
}
