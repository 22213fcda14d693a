using System.CommandLine;
using System.Diagnostics;
using UblkSharp.Cli.Logging;
using UblkSharp.Runtime;
using UblkSharp.Ublk;

namespace UblkSharp.Cli.Commands;

/// <summary>
/// `ublksharp mount IMAGE DIR`, like `mount -o loop`: a loop device with autoclear, then mount.
/// A plain `umount DIR` later deletes the device. A qcow2 image (by its magic) is served by the
/// qcow2 target, writable unless -r, as a raw image is.
/// </summary>
internal static class MountCommand
{
    public static Command Create()
    {
        var image = new Argument<string>("image") { Description = "The file system image" };
        var dir = new Argument<string>("dir") { Description = "Where to mount it" };
        var options = new Option<string?>("--options", "-o") { Description = "mount options, as for mount -o" };
        var fsType = new Option<string?>("--types", "-t") { Description = "file system type, as for mount -t" };
        var readOnly = new Option<bool>("--read-only", "-r") { Description = "mount read-only (and serve the image read-only)" };
        var command = new Command("mount", "Mount a file system image through a ublk loop device that deletes itself on umount") { image, dir, options, fsType, readOnly };
        command.SetAction(r =>
        {
            var file = r.GetValue(image)!;
            var target = r.GetValue(dir)!;
            if (!File.Exists(file))
            {
                throw new ArgumentException($"{file}: no such file");
            }
            if (!Directory.Exists(target))
            {
                throw new ArgumentException($"{target}: no such directory");
            }
            Preflight.RequireRootAndDriver();
            var qcow2 = IsQcow2(file);
            var ro = r.GetValue(readOnly);
            var add = new List<string> { "add", "-t", qcow2 ? "qcow2" : "loop", "-f", Path.GetFullPath(file), "--autoclear" };
            if (ro)
            {
                add.Add("--read-only");
            }
            var (id, path) = DaemonLauncher.Launch([.. add]);
            var psi = new ProcessStartInfo("mount") { UseShellExecute = false, RedirectStandardError = true };
            if (r.GetValue(fsType) is { } t)
            {
                psi.ArgumentList.Add("-t");
                psi.ArgumentList.Add(t);
            }
            var o = r.GetValue(options);
            if (ro)
            {
                o = o is null ? "ro" : o + ",ro";
            }
            if (o is not null)
            {
                psi.ArgumentList.Add("-o");
                psi.ArgumentList.Add(o);
            }
            psi.ArgumentList.Add(path);
            psi.ArgumentList.Add(Path.GetFullPath(target));
            using var mount = Process.Start(psi) ?? throw new IOException("could not run mount");
            var err = mount.StandardError.ReadToEnd();
            if (!mount.WaitForExit(TimeSpan.FromMinutes(2)) || mount.ExitCode != 0)
            {
                // Never mounted, so autoclear would wait forever: delete the device here.
                using (var control = ControlDevice.Open())
                {
                    DeviceDeletion.Delete(control, id, force: true, CliLog.Logger);
                }
                throw new IOException($"mount {path} {target} failed: {err.Trim()}");
            }
            Console.WriteLine(path);
            return 0;
        });
        return command;
    }

    private static bool IsQcow2(string file)
    {
        Span<byte> start = stackalloc byte[4];
        using var handle = File.OpenHandle(file, FileMode.Open, FileAccess.Read);
        return RandomAccess.Read(handle, start, 0) == 4 && Targets.Qcow2.Qcow2Header.HasMagic(start);
    }
}
